"""LoRA adapters on a multi-model, data-parallel server: ``ithaca serve`` of a tiny
FLUX.1 checkpoint with 2 data-parallel worker groups (one rank each, torchrun) and a
tiny Wan2.2 T2V-A14B checkpoint, ``--lora NAME=PATH@MODEL`` preloading one adapter into
each.

- ``/v1/loras`` per model: the listing names each entry's model, ``?model=`` filters,
  ``POST`` / ``DELETE`` act on the named model, an unknown model is 400 ``param:
  model``; a file of one model does not fit the other (400 naming the key); a request
  naming another model's adapter is 400 ``param: lora``.
- Data parallel and restarts: an adapter POSTed at run time; then a rank of group 0 is
  killed and, while it restarts, group 1 serves the adapter's request; then group 1's
  rank is killed and the restarted group 0 (the engine replays the adapter table into
  it before it serves) serves it: every time exactly the solo bytes.
- Video jobs: the job object names the adapters and scales applied.
64x64 px images, 2 steps; videos 48x48 px, 5 frames, 2 steps.
"""

from __future__ import annotations

import base64
import os
import signal
import time

import pytest

from ithaca.testing.lora import random_lora, save_safetensors

IMAGE = {"prompt": "a red cat", "size": "64x64", "num_inference_steps": 2, "seed": 5,
         "guidance_scale": 3.5, "model": "flux"}  # fmt: skip


@pytest.fixture(scope="module")
def server(serve, tiny_family, tiny_wan, tmp_path_factory):
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    from ithaca.models.flux.pipeline import FluxPipeline

    root = tmp_path_factory.mktemp("lora_models")
    flux, wan = tiny_family(FluxPipeline), tiny_wan["t2v_a14b"]
    flux_model = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer")
    wan_model = WanTransformer3DModel.from_pretrained(wan, subfolder="transformer")
    lora_dir = root / "loras"
    a = save_safetensors(random_lora(flux_model, seed=1), lora_dir / "a.safetensors")
    save_safetensors(random_lora(flux_model, seed=2, targets=("ff.net.2",)),
                     lora_dir / "b.safetensors")  # fmt: skip
    w = save_safetensors(random_lora(wan_model, seed=3, targets=("attn1.to_q", "ffn.net.2")),
                         lora_dir / "w.safetensors")  # fmt: skip
    return serve(
        f"{flux}@dp=2,name=flux", "--model", f"{wan}@name=wan",
        "--lora", f"A={a}:0.8@flux", "--lora", f"W={w}:0.7@wan", "--lora-dir", str(lora_dir),
        "--max-batch-size", "1", "--batch-invariant", "--executor", "torchrun", timeout=600,
    )  # fmt: skip


def _image(server, lora=None) -> bytes:
    body = dict(IMAGE, **({"lora": lora} if lora is not None else {}))
    r = server.client.post("/v1/images/generations", json=body, timeout=300)
    if r.status_code == 503:  # a dying group's dispatcher took it ("retry shortly")
        r = server.client.post("/v1/images/generations", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


def _flux_groups(server) -> list[dict]:
    groups = server.client.get("/health").json()["groups"]
    return groups[:2]  # the first model's two data-parallel groups, then the video model's


def _wait(server, condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{server.log()[-3000:]}"
        time.sleep(0.1)


def _kill_and_wait_down(server, index: int) -> int:
    pid = _flux_groups(server)[index]["ranks"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    _wait(server, lambda: not _flux_groups(server)[index]["alive"] or _pid(server, index) != pid,
          f"group {index} to go down")  # fmt: skip
    return pid


def _pid(server, index: int) -> int:
    ranks = _flux_groups(server)[index]["ranks"]
    return ranks[0]["pid"] if ranks else -1


def _back(server, index: int, old_pid: int) -> bool:
    group = _flux_groups(server)[index]
    return group["alive"] and _pid(server, index) not in (old_pid, -1)


def test_loras_are_per_model(server):
    listed = server.client.get("/v1/loras").json()["data"]
    assert listed == [{"name": "A", "scale": 0.8, "model": "flux"},
                      {"name": "W", "scale": 0.7, "model": "wan"}]  # fmt: skip
    assert server.client.get("/v1/loras?model=wan").json()["data"] == [listed[1]]
    r = server.client.get("/v1/loras?model=nope")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    r = server.client.post("/v1/loras", json={"name": "X", "path": "a.safetensors", "model": "no"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    r = server.client.post("/v1/loras", json={"name": "X", "path": "b.safetensors", "model": "wan"})
    assert r.status_code == 400 and "lora_A" in r.json()["error"]["message"], r.text
    assert server.client.get("/v1/loras?model=wan").json()["data"] == [listed[1]]
    r = server.client.post("/v1/images/generations", json=dict(IMAGE, lora="W"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text  # wan's
    r = server.client.delete("/v1/loras/W?model=flux")
    assert r.status_code == 404, r.text


def test_data_parallel_groups_and_restarts_keep_posted_adapters(server):
    r = server.client.post("/v1/loras", json={"name": "B", "path": "b.safetensors",
                                              "scale": 0.5, "model": "flux"})  # fmt: skip
    assert r.status_code == 200 and r.json()["model"] == "flux", r.text
    base, with_a, with_b = _image(server), _image(server, "A"), _image(server, "B")
    assert len({base, with_a, with_b}) == 3
    old = _kill_and_wait_down(server, 0)
    assert _image(server, "B") == with_b  # group 1 (or group 0 once restarted)
    _wait(server, lambda: _back(server, 0, old), "group 0 to restart")
    old = _kill_and_wait_down(server, 1)
    assert _image(server, "B") == with_b  # the restarted group 0: the adapter replayed
    assert _image(server, "A") == with_a and _image(server) == base
    _wait(server, lambda: _back(server, 1, old), "group 1 to restart")
    assert server.client.delete("/v1/loras/B").json()["model"] == "flux"
    assert [e["name"] for e in server.client.get("/v1/loras?model=flux").json()["data"]] == ["A"]


def test_video_job_names_its_adapters(server):
    body = {"model": "wan", "prompt": "a red cat", "size": "48x48", "num_frames": 5,
            "num_inference_steps": 2, "seed": 1,
            "lora": [{"name": "W", "expert": "high_noise"}]}  # fmt: skip
    r = server.client.post("/v1/videos", json=body)
    assert r.status_code == 200, r.text
    applied = [{"name": "W", "scale": 0.7, "expert": "high_noise"}]  # the default scale
    assert r.json()["lora"] == applied
    video_id = r.json()["id"]
    _wait(server, lambda: server.client.get(f"/v1/videos/{video_id}").json()["status"]
          in ("completed", "failed"), "the video")  # fmt: skip
    job = server.client.get(f"/v1/videos/{video_id}").json()
    assert job["status"] == "completed" and job["lora"] == applied, job
