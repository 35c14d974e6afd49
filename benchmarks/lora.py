"""Time per denoising step with a LoRA adapter unfused vs fused vs none, in one run.

Builds the tiny FLUX.1 checkpoint and a random rank-``--rank`` adapter on every
attention projection, feed-forward output and ``proj_out``, then runs the same
request ``--repeats`` times per mode on one process and prints the median time per
step of the denoising loop and its ratio to the base model:

- ``none``: the adapter loaded but not asked for (the base layers run alone);
- ``unfused``: the adapter beside the base layers (``x W + s (x A) B``);
- ``fused``: the adapter merged into the weights (``--lora-fuse auto``: kept merged while
  the same set serves consecutive requests; the base weights come back bit for bit when
  it changes).

The three modes take turns within every repeat (not one block per mode), so the figures
stay comparable on a shared machine whose load changes during the run.

    python benchmarks/lora.py                        # 256x256 px, 8 steps, rank 16
    python benchmarks/lora.py --size 512 --rank 64

On the tiny checkpoint the step is small, so the table shows the adapter's overhead
relative to a small model; a real checkpoint on a GPU is where the fused row matters.
"""

from __future__ import annotations

import statistics
import tempfile

import torch
from common import options

from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.testing.lora import random_lora, save_safetensors
from ithaca.testing.tiny_families import build_tiny_flux
from ithaca.types import GenerationParams, LoraRef

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "ff.net.2", "proj_out",
           "proj_mlp")  # fmt: skip


MODES = {"none": (False, False), "unfused": (True, False), "fused": (True, True)}
"""mode -> (request names the adapter, ``fuse_loras``)."""


def per_step(pipe, request: dict, adapter: tuple, repeats: int) -> dict[str, float]:
    """Median seconds per step of each mode. The modes take turns within each repeat, so
    a shared machine's changing load falls on all of them alike; switching to ``fused``
    merges the set before its loop and away from it restores the base weights (both
    outside the timed loop, like a run of requests with one set)."""
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(repeats + 1):  # the first round warms up
        for mode, (with_adapter, fuse) in MODES.items():
            pipe.fuse_loras = fuse
            params = GenerationParams(**request, lora=adapter if with_adapter else ())
            result = pipe.generate([params])[0]
            if repeat:
                steps = request["num_inference_steps"]
                times[mode].append(result.metadata["timings"]["denoise_s"] / steps)
    return {mode: statistics.median(t) for mode, t in times.items()}


def main() -> None:
    args = options(__doc__, size=256, steps=8, rank=16, repeats=5).parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        path = str(build_tiny_flux(f"{root}/flux"))
        pipe = load_pipeline(path, ParallelState.single())
        adapter = random_lora(pipe.transformer, rank=args.rank, targets=TARGETS)
        file = save_safetensors(adapter, f"{root}/a.safetensors")
        request = dict(prompt="a red cat", width=args.size, height=args.size, seed=0,
                       num_inference_steps=args.steps)  # fmt: skip
        pipe.load_lora("a", file, 0.8)
        rows = list(per_step(pipe, request, (LoraRef("a"),), args.repeats).items())
    layers = len(adapter) // 2
    print(f"tiny FLUX.1, {args.size}x{args.size} px, {args.steps} steps, rank {args.rank} on "
          f"{layers} layers, 1 process x 1 thread, median of {args.repeats}")  # fmt: skip
    print(f"{'mode':<8} {'ms/step':>9} {'vs none':>8}")
    base = rows[0][1]
    for mode, seconds in rows:
        print(f"{mode:<8} {seconds * 1e3:>9.2f} {seconds / base:>7.2f}x")


if __name__ == "__main__":
    main()
