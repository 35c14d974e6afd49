"""Our Qwen-Image pipeline against diffusers' on the same checkpoint and settings.

Not a test: prints a markdown table (paste it into docs/performance.md).

- 1 rank: ``ithaca`` (``load_pipeline`` + ``generate``) vs ``diffusers.QwenImagePipeline``,
  same prompt, negative prompt (true CFG), size, steps and seed; the median wall time of
  ``--repeats`` runs after one warm-up each, interleaved (ours, theirs, ours, ...) so that
  a change of machine load hits both, and their ratio (ours / diffusers; < 1 means ours
  is faster). One torch thread by default: on a shared machine more threads mostly
  measure the neighbours. The final images are compared too.
- 2 ranks (gloo, one thread per rank): our Ulysses-2 vs diffusers' own context
  parallelism (``transformer.enable_parallelism(ContextParallelConfig(ulysses_degree=2))``)
  where it runs; when it does not, the table says why.

Usage: ``python benchmarks/pipeline.py [--width 512 --height 512 --steps 8 --repeats 5]``
(``--model`` a diffusers Qwen-Image directory; default: the tiny checkpoint).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

PROMPT = "a small red cat sitting on a blue mat"
NEGATIVE = "blurry"


def _settings(args) -> dict:
    return dict(width=args.width, height=args.height, steps=args.steps, seed=1)


def _ours_params(s: dict):
    from ithaca.types import GenerationParams

    return GenerationParams(
        prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, width=s["width"],
        height=s["height"], num_inference_steps=s["steps"], seed=s["seed"],
    )  # fmt: skip


def _diffusers_call(pipe, s: dict):
    return pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, width=s["width"],
        height=s["height"], num_inference_steps=s["steps"], output_type="np",
        generator=torch.Generator().manual_seed(s["seed"]),
    ).images[0]  # fmt: skip


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def ours(layout: dict, path: str, s: dict, repeats: int):
    """Our pipeline under ``layout`` (run on every rank); (median s, image) on rank 0."""
    from ithaca.config import ParallelConfig
    from ithaca.models.registry import load_pipeline
    from ithaca.testing.distributed import parallel_state

    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        seconds, results = _timed(lambda: pipe.generate([_ours_params(s)]), repeats)
        pipe.runtime.remove()
        image = np.asarray(results[0].images[0]) if results[0].images else None
        return seconds, image


def reference(cp_degree: int, path: str, s: dict, repeats: int):
    """diffusers' pipeline; with ``cp_degree`` > 1 its context parallelism (every rank)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if cp_degree > 1:
        from diffusers import ContextParallelConfig

        try:
            pipe.transformer.enable_parallelism(
                config=ContextParallelConfig(ulysses_degree=cp_degree)
            )
            seconds, image = _timed(lambda: _diffusers_call(pipe, s), repeats)
        except Exception as exc:  # report, do not crash the benchmark
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    else:
        seconds, image = _timed(lambda: _diffusers_call(pipe, s), repeats)
    return seconds, (image * 255).round().astype(np.uint8)


def one_rank(path: str, s: dict, repeats: int):
    """Both pipelines in this process, runs interleaved so that load changes hit both."""
    from diffusers import DiffusionPipeline

    from ithaca.models.registry import load_pipeline
    from ithaca.parallel import ParallelState

    mine = load_pipeline(path, ParallelState.single())
    ref = DiffusionPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    run_mine = lambda: mine.generate([_ours_params(s)])[0].images[0]  # noqa: E731
    run_ref = lambda: _diffusers_call(ref, s)  # noqa: E731
    run_mine(), run_ref()  # warm-up
    t_mine, t_ref = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        img_mine = run_mine()
        t_mine.append(time.perf_counter() - start)
        start = time.perf_counter()
        img_ref = run_ref()
        t_ref.append(time.perf_counter() - start)
    img_ref = (img_ref * 255).round().astype(np.uint8)
    return statistics.median(t_mine), statistics.median(t_ref), np.asarray(img_mine), img_ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 rank)")
    parser.add_argument("--skip-two-ranks", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = _settings(args)

    path = args.model
    if path is None:
        from ithaca.testing.tiny import build_tiny_qwen_image

        path = str(build_tiny_qwen_image(tempfile.mkdtemp(prefix="bench-qwen-"), "t2i"))

    rows = []
    t_ours, t_ref, img_ours, img_ref = one_rank(path, s, args.repeats)
    diff = int(np.abs(img_ours.astype(int) - img_ref.astype(int)).max())
    rows.append(("1 rank", "ithaca", "diffusers QwenImagePipeline", t_ours, t_ref, diff))

    if not args.skip_two_ranks:
        from ithaca.testing.distributed import WorkerPool

        pool = WorkerPool(2)
        try:
            t_u, img_u = pool.run(ours, dict(ulysses_degree=2), path, s, args.repeats)[0]
            t_cp, img_cp = pool.run(reference, 2, path, s, args.repeats)[0]
        finally:
            pool.close()
        diff = int(np.abs(img_u.astype(int) - img_ref.astype(int)).max())
        rows.append(("2 ranks", "ithaca ulysses=2", "diffusers CP ulysses=2", t_u, t_cp, diff))
        if t_cp is None:
            rows[-1] = (*rows[-1][:4], img_cp, diff)  # the error text instead of a time

    print(
        f"\nQwen-Image, {args.width}x{args.height}, {args.steps} steps, true CFG, "
        f"median of {args.repeats}, torch threads {args.threads} (1 rank) / 1 per rank "
        f"(2 ranks), tiny checkpoint unless --model\n"
    )
    header = ("layout", "ours", "reference", "ours (s)", "reference (s)", "ratio",
              "max image diff vs diffusers 1 rank")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for layout, name, ref_name, t_a, t_b, d in rows:
        if isinstance(t_b, str):
            cells = [f"{t_a:.3f}", f"did not run: {t_b}", "-"]
        else:
            cells = [f"{t_a:.3f}", f"{t_b:.3f}", f"{t_a / t_b:.2f}"]
        print("| " + " | ".join([layout, name, ref_name, *cells, f"{d}/255"]) + " |")


if __name__ == "__main__":
    main()
