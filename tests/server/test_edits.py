"""``/v1/images/edits`` on the tiny Qwen-Image-Edit-Plus checkpoint at --usp 2: the
openai SDK with two ``image[]`` files, the JSON form with data URLs, and multipart
numbers arriving as strings. The checkpoint states a 128x128 px edit area
(``_ithaca_defaults``): the input images are not encoded at 1024x1024 px."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from ithaca.server.media import b64
from tests.server.test_units import png_bytes


@pytest.fixture(scope="module")
def server(serve, tiny_checkpoints, with_defaults):
    path = with_defaults(tiny_checkpoints["edit_plus"], width=128, height=128)
    return serve(path, "--usp", "2", "--served-model-name", "tiny-edit")


def pixels(b64_json: str) -> np.ndarray:
    im = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    assert im.size == (64, 64)
    return np.asarray(im.convert("RGB"), dtype=int)


def test_sdk_edit_with_two_images(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    red = ("red.png", png_bytes((48, 48), (220, 20, 20)), "image/png")
    blue = ("blue.jpg", _jpeg((40, 56), (20, 20, 220)), "image/jpeg")
    extra = {"num_inference_steps": 2, "seed": 1}
    res = client.images.edit(
        model="tiny-edit", image=[red, blue], prompt="put the cat on the mat", size="64x64",
        extra_body=extra,
    )  # fmt: skip
    assert res.output_format == "png" and res.size == "64x64"
    pixels(res.data[0].b64_json)


def test_json_edit_with_data_urls_and_multipart_strings(server):
    c = server.client
    url = "data:image/png;base64," + b64(png_bytes((48, 48), (220, 20, 20)))
    body = {"prompt": "make it blue", "images": [{"image_url": url}], "size": "64x64",
            "num_inference_steps": 2, "seed": 4}  # fmt: skip
    r = c.post("/v1/images/edits", json=body)
    assert r.status_code == 200, r.text
    via_json = pixels(r.json()["data"][0]["b64_json"])
    form = {"prompt": "make it blue", "size": "64x64", "num_inference_steps": "2", "seed": "4",
            "n": "1", "stream": "false", "output_format": "png"}  # fmt: skip
    files = {"image": ("in.png", png_bytes((48, 48), (220, 20, 20)), "application/octet-stream")}
    r = c.post("/v1/images/edits", data=form, files=files)
    assert r.status_code == 200, r.text
    # Exact by construction: the same decoded input through the same server and code path.
    assert np.array_equal(via_json, pixels(r.json()["data"][0]["b64_json"]))


def _jpeg(size, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()
