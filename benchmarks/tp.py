"""Tensor parallel: time per denoising step at TP 1 vs TP 2, side by side.

Not a test: prints a markdown table (paste it into docs/parallel.md). One step is one
transformer forward (a CFG branch); the transformer is a Qwen-Image-shaped one with
random weights (seed 0, the same on every rank), ``--layers`` blocks of ``--heads`` x 64
hidden, fp32, on a ``--size`` px image (``(size/16)^2`` tokens) and 64 text tokens.

Rows, each the median of ``--repeats`` forwards after one warm-up, all in one run:
TP 1 on one rank with 1 and with 2 torch threads (the same cores TP 2 uses), TP 2 and
Ulysses 2 on two gloo ranks with one thread each; the ratio column is against TP 1 with
one thread, and every parallel row reports its max abs difference from TP 1's output.
On a 2-core CPU this measures the algorithm (work split, all-reduce volume), not a GPU
interconnect.

Usage: ``python benchmarks/tp.py [--size 512 --layers 4 --heads 8 --repeats 5]``
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from common import options


def _transformer(heads: int, layers: int):
    from ithaca.models.qwen_image.transformer import QwenImageTransformer2DModel

    torch.manual_seed(0)
    dim = heads * 64
    return QwenImageTransformer2DModel(
        num_layers=layers, attention_head_dim=64, num_attention_heads=heads,
        joint_attention_dim=dim, axes_dims_rope=(8, 28, 28), in_channels=64, out_channels=16,
    ).eval()  # fmt: skip


def _inputs(size: int, dim: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    side = size // 16  # 8x VAE, 2x2 patches
    return dict(
        hidden_states=torch.randn(1, side * side, 64, generator=generator),
        timestep=torch.tensor([0.5]),
        encoder_hidden_states=torch.randn(1, 64, dim, generator=generator),
        encoder_hidden_states_mask=torch.ones(1, 64, dtype=torch.long),
        img_shapes=[(1, side, side)],
        return_dict=False,
    )


@torch.no_grad()
def step_time(layout: dict, args: dict, threads: int = 1):
    """``(median seconds per forward, output)`` of one layout (run on every rank)."""
    from ithaca.config import ParallelConfig
    from ithaca.models.qwen_image.transformer import QWEN_IMAGE_ATTENTION
    from ithaca.parallel import ParallelState
    from ithaca.runtime.parallelize import parallelize
    from ithaca.testing.distributed import parallel_state

    torch.set_num_threads(threads)
    config = ParallelConfig(**layout)
    single = contextlib.nullcontext(ParallelState.single())
    with parallel_state(config) if config.world_size > 1 else single as state:
        model = _transformer(args["heads"], args["layers"])
        runtime = parallelize(model, state, QWEN_IMAGE_ATTENTION)
        inputs = _inputs(args["size"], args["heads"] * 64)
        out = model(**inputs)[0]  # warm-up
        times = []
        for _ in range(args["repeats"]):
            start = time.perf_counter()
            out = model(**inputs)[0]
            times.append(time.perf_counter() - start)
        runtime.remove()
        return statistics.median(times), out


def main() -> None:
    a = options(__doc__, size=512, layers=4, heads=8, repeats=5).parse_args()
    args = dict(size=a.size, layers=a.layers, heads=a.heads, repeats=a.repeats)

    from ithaca.testing.distributed import WorkerPool

    rows = [("TP 1, 1 thread", *step_time({}, args, 1))]
    rows.append(("TP 1, 2 threads", *step_time({}, args, 2)))
    pool = WorkerPool(2)
    try:
        for name, layout in (("TP 2", dict(tensor_parallel_size=2)),
                             ("Ulysses 2", dict(ulysses_degree=2))):  # fmt: skip
            rows.append((f"{name}, 2 ranks x 1 thread", *pool.run(step_time, layout, args)[0]))
    finally:
        pool.close()

    base, ref = rows[0][1], rows[0][2]
    tokens = (a.size // 16) ** 2
    print(
        f"\nQwen-Image-shaped transformer, {a.layers} blocks, {a.heads} heads x 64, "
        f"{a.size}x{a.size} px ({tokens} image + 64 text tokens), fp32, gloo; "
        f"median of {a.repeats} forwards\n"
    )
    print("| layout | s / step | vs TP 1, 1 thread | max abs diff vs TP 1 |")
    print("|---|---:|---:|---:|")
    for name, seconds, out in rows:
        diff = (out - ref).abs().max().item()
        print(f"| {name} | {seconds:.3f} | {seconds / base:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
