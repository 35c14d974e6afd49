"""``/v1/loras`` and the ``lora`` request field against ``ithaca serve`` on a tiny
FLUX.1 checkpoint at ``--usp 2`` (every rank of the torchrun group loads the adapters).

Requests with adapter A, adapter B and none, interleaved at concurrency 8, each get
exactly the bytes they get alone (each request runs its own loop, the adapter set is
part of the batching key); after ``DELETE`` the base images are bit-identical to those
before any adapter was applied; bad input: unknown name 400 ``param: lora``, a file that
does not fit 400 naming its key (nothing loaded), a path outside ``--lora-dir`` 403,
no API key 401. 64x64 px, 2 steps.
"""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from ithaca.models.flux.pipeline import FluxPipeline
from ithaca.testing.lora import random_lora, save_safetensors

API_KEY = "sk-lora"
SMALL = {"num_inference_steps": 2, "guidance_scale": 3.5}


@pytest.fixture(scope="module")
def setup(serve, tiny_family, tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("lora_server")
    path = tiny_family(FluxPipeline)
    model = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    lora_dir = root / "loras"
    a = save_safetensors(random_lora(model, seed=1), lora_dir / "a.safetensors")
    save_safetensors(random_lora(model, seed=2, targets=("ff.net.2",)), lora_dir / "b.safetensors")
    bad = random_lora(model, seed=3)
    key = sorted(bad)[1]
    bad[key] = torch.zeros(5, 4)
    save_safetensors(bad, lora_dir / "bad.safetensors")
    save_safetensors({"x": torch.zeros(1)}, root / "outside.safetensors")
    server = serve(
        path, "--usp", "2", "--lora", f"A={a}:0.8",
        "--lora-dir", str(lora_dir), "--max-loras", "2", "--max-batch-size", "4",
        "--batch-wait-ms", "100", "--max-queue-size", "32", "--executor", "torchrun",
        "--batch-invariant",  # the test compares exact bytes under concurrency
        api_key=API_KEY, timeout=300,
    )  # fmt: skip
    return server, key


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _image(server, lora, seed=5) -> tuple[bytes, list | None]:
    extra = {**SMALL, "seed": seed}
    if lora is not None:
        extra["lora"] = lora
    response = _client(server).images.generate(
        model=server_model(server), prompt="a red cat", size="64x64", extra_body=extra
    )
    return base64.b64decode(response.data[0].b64_json), getattr(response, "lora", None)


def server_model(server) -> str:
    return server.client.get("/v1/models").json()["data"][0]["id"]


def test_adapters_under_concurrency_and_delete_restores_the_base(setup):
    server, _ = setup
    assert server.client.get("/v1/loras").json()["data"] == [{"name": "A", "scale": 0.8}]
    base_before, applied = _image(server, None)
    assert applied is None
    r = server.client.post("/v1/loras", json={"name": "B", "path": "b.safetensors", "scale": 1.0})
    assert r.status_code == 200, r.text
    assert r.json()["resident"] is True
    solo = {"A": _image(server, "A"), "B": _image(server, [{"name": "B", "scale": 0.5}]),
            None: (base_before, None)}  # fmt: skip
    assert solo["A"][1] == [{"name": "A", "scale": 0.8}]
    assert solo["B"][1] == [{"name": "B", "scale": 0.5}]
    assert len({solo["A"][0], solo["B"][0], base_before}) == 3
    kinds = ["A", "B", None] * 3
    asks = {"A": "A", "B": [{"name": "B", "scale": 0.5}], None: None}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: _image(server, asks[k]), kinds))
    for kind, (image, _) in zip(kinds, results, strict=True):
        assert image == solo[kind][0], f"request with {kind} got another image"
    for name in ("A", "B"):
        r = server.client.delete(f"/v1/loras/{name}")
        assert r.status_code == 200, r.text
    assert server.client.get("/v1/loras").json()["data"] == []
    assert _image(server, None)[0] == base_before


def test_bad_input(setup):
    server, bad_key = setup
    r = server.client.post(
        "/v1/images/generations",
        json={"prompt": "a cat", "size": "64x64", "lora": "nope", **SMALL},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text
    r = server.client.post("/v1/loras", json={"name": "X", "path": "../outside.safetensors"})
    assert r.status_code == 403 and r.json()["error"]["param"] == "path", r.text
    r = server.client.post("/v1/loras", json={"name": "X", "path": "/etc/passwd"})
    assert r.status_code == 403, r.text
    before = server.client.get("/v1/loras").json()
    r = server.client.post("/v1/loras", json={"name": "bad", "path": "bad.safetensors"})
    assert r.status_code == 400, r.text
    assert bad_key in r.json()["error"]["message"] and "FLUX.1" in r.json()["error"]["message"]
    assert server.client.get("/v1/loras").json() == before  # nothing loaded half
    r = server.client.delete("/v1/loras/nope")
    assert r.status_code == 404, r.text
    anonymous = server.client.get("/v1/loras", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert os.path.exists(server.state_dir)
