"""``--compile`` against eager on one loaded pipeline, side by side in one run.

Loads the model once (default: the embedded default model), times ``--repeats`` eager
requests, compiles the repeated blocks (cold start: compile + warm-up, printed), then
alternates eager and compiled requests so both see the same machine load. Time per step
is the pipeline's own denoising time (``metadata["timings"]["denoise_s"]``) divided by
the steps; the whole request (prompt encoding and VAE decode, not compiled) is shown
beside it. The last column is the largest pixel difference of the compiled image from
the eager one (same seed).

    PYTHONPATH=$PWD python benchmarks/compile.py --size 128x128 --steps 20 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from ithaca.models.registry import load_pipeline
from ithaca.models.shapes import shipped_checkpoint_path
from ithaca.parallel import ParallelState
from ithaca.runtime.compiled import compile_pipeline, use_cache_dir, warm_up
from ithaca.types import GenerationParams


def _run(pipeline, params: GenerationParams) -> tuple[float, float, np.ndarray]:
    started = time.perf_counter()
    result = pipeline.generate([params])[0]
    total = time.perf_counter() - started
    per_step = result.metadata["timings"]["denoise_s"] / params.num_inference_steps
    return per_step, total, np.asarray(result.images[0], dtype=np.int16)


def _use(blocks, forwards) -> None:
    for block, forward in zip(blocks, forwards, strict=True):
        if forward is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: embedded model)")
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dynamic", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--cache-dir", default=None, help="inductor cache (default: a new one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    use_cache_dir(args.cache_dir or tempfile.mkdtemp(prefix="ithaca-compile-"))
    pipeline = load_pipeline(args.model or shipped_checkpoint_path(), ParallelState.single())
    params = GenerationParams(
        prompt="a red circle in the centre", width=width, height=height,
        num_inference_steps=args.steps, seed=1,
    )  # fmt: skip
    _run(pipeline, params)  # eager warm-up (allocator, first-call costs)

    dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
    started = time.perf_counter()
    count = compile_pipeline(pipeline, dynamic=dynamic)
    warm = warm_up(pipeline, [(width, height)])
    cold = time.perf_counter() - started
    blocks = [b for b in pipeline.transformer.modules() if "forward" in b.__dict__]
    compiled = [b.__dict__["forward"] for b in blocks]
    eager = [None] * len(blocks)
    print(f"compiled {count} blocks; cold start {cold:.1f} s (warm-up {warm:.1f} s); "
          f"inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")  # fmt: skip

    rows = {"eager": [], "compiled": []}
    images = {}
    for _ in range(args.repeats):  # alternate: both modes see the same load
        for mode, forwards in (("eager", eager), ("compiled", compiled)):
            _use(blocks, forwards)
            per_step, total, image = _run(pipeline, params)
            rows[mode].append((per_step, total))
            images[mode] = image
    diff = int(np.abs(images["eager"] - images["compiled"]).max())
    load = os.getloadavg()[0]
    print(f"\n{args.size}, {args.steps} steps, {args.threads} thread(s), median of "
          f"{args.repeats} alternating runs, load average {load:.1f}\n")  # fmt: skip
    print("| mode | s/step | request s | step speed-up | max diff vs eager |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(s for s, _ in rows["eager"])
    for mode, values in rows.items():
        step = statistics.median(s for s, _ in values)
        total = statistics.median(t for _, t in values)
        shown = f"{diff}/255" if mode == "compiled" else "-"
        print(f"| {mode} | {step:.4f} | {total:.3f} | {base / step:.2f}x | {shown} |")


if __name__ == "__main__":
    main()
