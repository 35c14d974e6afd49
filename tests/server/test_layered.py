"""``/v1/images/edits`` on the tiny Qwen-Image-Layered checkpoint (in-process executor,
served in this process through an ASGI transport: the routes are the point here):
every RGBA layer of every image comes back as its own ``data[]`` entry, byte for byte
what the pipeline returns in-process; ``layers`` is validated at the edge."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.server.media import b64
from ithaca.testing.tiny import build_tiny_qwen_image
from ithaca.types import GenerationParams

STEPS = {"num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint(build_tiny_qwen_image, "layered")


@pytest.fixture(scope="module")
def server(model_server, model):
    return model_server(model, "tiny-layered")


def _input() -> Image.Image:
    """An RGBA input whose alpha matters: a transparent left half."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 255, (48, 48, 4), dtype=np.uint8)
    pixels[:, :24, 3] = 0
    return Image.fromarray(pixels, "RGBA")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _decode(b64_json: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64_json)))


def test_sdk_edit_returns_every_layer_as_an_rgba_png(server, model):
    client = server.openai(api_key="x", max_retries=0, timeout=120)
    res = client.images.edit(
        model="tiny-layered", image=("in.png", _png(_input()), "image/png"), prompt="a red cat",
        size="64x64", n=2, extra_body={**STEPS, "layers": 3},
    )  # fmt: skip
    assert len(res.data) == 2 * 3 and res.size == "64x64" and res.background == "transparent"
    layers = [_decode(d.b64_json) for d in res.data]
    assert all(im.format == "PNG" and im.mode == "RGBA" and im.size == (64, 64) for im in layers)
    # The pipeline's layers, image-major, from the RGBA input (alpha kept): within 1/255
    # (the project's image tolerance: the engine's batch is computed apart from this call).
    pipe = load_pipeline(model, ParallelState.single())
    params = GenerationParams(prompt="a red cat", width=64, height=64, num_images=2, layers=3,
                              images=[_input()], **STEPS)  # fmt: skip
    expected = pipe.generate([params])[0].images
    assert _max_diff(layers, expected) <= 1
    opaque = GenerationParams(**{**params.__dict__, "images": [_input().convert("RGB")]})
    assert _max_diff(layers, pipe.generate([opaque])[0].images) > 10


def _max_diff(a: list, b: list) -> int:
    pairs = zip(a, b, strict=True)
    return max(int(np.abs(np.asarray(x, int) - np.asarray(y, int)).max()) for x, y in pairs)


def test_json_edit_uses_the_default_layer_count(server):
    url = "data:image/png;base64," + b64(_png(_input()))
    body = {"prompt": "a red cat", "images": [{"image_url": url}], "size": "64x64", **STEPS}
    r = server.post("/v1/images/edits", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 4  # Qwen-Image-Layered's default: 4 layers


@pytest.mark.parametrize("value", ["0", "17", "two"])
def test_invalid_layers_is_a_400_naming_the_param(server, value):
    form = {"prompt": "a red cat", "size": "64x64", "layers": value, "num_inference_steps": "2"}
    files = {"image": ("in.png", _png(_input()), "image/png")}
    r = server.post("/v1/images/edits", data=form, files=files)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "layers" and error["type"] == "invalid_request_error"


def test_a_layered_model_needs_an_input_image(server):
    r = server.post("/v1/images/generations", json={"prompt": "a red cat", **STEPS})
    assert r.status_code == 400, r.text
    assert "needs exactly one input image" in r.json()["error"]["message"]
