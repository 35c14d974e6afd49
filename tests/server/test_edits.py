"""``/v1/images/edits`` on the tiny Qwen-Image-Edit-Plus checkpoint (served in this
process through an ASGI transport: the routes are the point): the openai SDK with two
``image[]`` files, the JSON form with data URLs, and multipart numbers arriving as strings.
The checkpoint states a 128x128 px edit area (``_ithaca_defaults``): the input images are
not encoded at 1024x1024 px. The process path - input images pickled to a 2-rank torchrun
group behind a real ``ithaca serve`` - runs on the shared ``fake_server``, whose pipeline
double blends the first input image's mean colour into its output."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from ithaca.server.media import b64
from tests.server.conftest import API_KEY
from tests.server.test_units import png_bytes


@pytest.fixture(scope="module")
def server(model_server, tiny_checkpoints, with_defaults):
    path = with_defaults(tiny_checkpoints["edit_plus"], width=128, height=128)
    return model_server(path, "tiny-edit")


def pixels(b64_json: str) -> np.ndarray:
    im = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    assert im.size == (64, 64)
    return np.asarray(im.convert("RGB"), dtype=int)


def test_sdk_edit_with_two_images(server):
    client = server.openai(api_key="x", max_retries=0, timeout=120)
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
    c = server
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


def test_edit_images_reach_the_ranks_of_a_real_server(fake_server):
    client = openai.OpenAI(base_url=fake_server.url + "/v1", api_key=API_KEY, max_retries=0,
                           timeout=120)  # fmt: skip

    def mean_colour(color) -> np.ndarray:
        res = client.images.edit(
            image=("in.png", png_bytes((48, 48), color), "image/png"), prompt="recolour",
            size="32x32", extra_body={"num_inference_steps": 2, "seed": 1},
        )  # fmt: skip
        im = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
        return np.asarray(im.convert("RGB"), dtype=float).mean((0, 1))

    # Same noise; the double blends in half the input's colour, and each of its 2 steps
    # halves the latents: (220, 20, 20) - (20, 20, 220) -> (200, 0, -200) / 8 (0.5: one
    # 8x8 px latent cell rounding the other way moves a mean by 1/16).
    difference = mean_colour((220, 20, 20)) - mean_colour((20, 20, 220))
    np.testing.assert_allclose(difference, [25, 0, -25], atol=0.5)


def _jpeg(size, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()
