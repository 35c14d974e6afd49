"""Smoke runs of the default models' training (tiny stage sizes): the shapes recipe with
two processes and then ``--reuse`` of its VAE and bank; the video recipe. Each result
loads through the serving registry and generates."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from ithaca.models.registry import load_pipeline
from ithaca.parallel.state import ParallelState
from ithaca.types import GenerationParams

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--bank", "8", "--val", "4", "--steps", "3", "--batch", "2", "--save-every", "3",
        "--warmup", "1"]  # fmt: skip
"""Smoke sizes: 8 training and 4 held-out scenes or clips (one batch per process)."""


def _train(module: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _steps(run) -> list[int]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if r.get("stage") == "transformer"]


def test_shapes_training_two_processes_then_reuse(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shapes = [*TINY, "--procs", "2", "--vae-steps", "3", "--vae-batch", "2", "--stats", "8",
              "--probe", "0", "--dtype", "float32"]  # fmt: skip
    _train("tools.shapes.train", "--out", str(a), *shapes)
    assert (a / "bank.pkl").is_file() and (a / "decoder.safetensors").is_file()
    _train("tools.shapes.train", "--out", str(b), "--reuse", str(a), *shapes)
    assert _steps(b) == [0]  # the transformer stage ran (logged every 50 steps from 0)
    va = load_file(str(a / "checkpoint" / "vae" / "diffusion_pytorch_model.safetensors"))
    vb = load_file(str(b / "checkpoint" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)  # reused
    pipe = load_pipeline(str(b / "checkpoint"), ParallelState.single())
    (result,) = pipe.generate(
        [GenerationParams(prompt="a red circle", width=32, height=32, num_inference_steps=2)]
    )
    assert result.images[0].size == (32, 32)


def test_video_training_gives_a_servable_wan_checkpoint(tmp_path):
    run = tmp_path / "v"
    _train("tools.video.train", "--out", str(run), *TINY)
    index = json.loads((run / "checkpoint" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and "moving" in index["_ithaca_vocabulary"]
    pipe = load_pipeline(str(run / "checkpoint"), ParallelState.single())
    (result,) = pipe.generate([GenerationParams(prompt="a red circle", num_inference_steps=2)])
    assert result.frames.shape == (17, 64, 64, 3) and result.fps == 8  # declared defaults
