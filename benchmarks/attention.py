"""Sequence-parallel attention: strong scaling and bytes on the wire, in one run.

For each sequence length, times one attention call (joint-free, fp32, B=1) on
1 process x 1 thread, then on P processes x 1 thread each for Ulysses, Ring and
hybrid, and prints strong-scaling efficiency ``t1 / (P * tP)`` next to the bytes
each rank sent per call and the theory:

    Ulysses: 4 * S * d / P  (q, k, v there and the output back; the (P-1)/P factor
             is the share of each all-to-all that leaves the rank)
    Ring:    2 * S * d * (P-1) / P  (K and V of every other rank's block, once)

where d = heads * head_dim * bytes per element. On a machine with fewer cores than
P, the P ranks share cores and efficiency measures the overhead, not a speed-up.

    python benchmarks/attention.py                      # 4k / 8k / 16k, P = 2 and 4
    python benchmarks/attention.py --seq 4096 --plot docs/attention_scaling.png
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from common import pyplot, save

from ithaca.config import ParallelConfig
from ithaca.parallel import ParallelAttention, ParallelState
from ithaca.testing.distributed import WorkerPool, parallel_state

HEADS, HEAD_DIM = 8, 64


def _inputs(seq: int, shard: tuple[int, int] | None = None):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq, HEADS, HEAD_DIM, generator=g) for _ in range(3))
    if shard is not None:
        rank, size = shard
        q, k, v = (t.chunk(size, dim=1)[rank].contiguous() for t in (q, k, v))
    return q, k, v


def time_single(seq: int, repeats: int) -> float:
    torch.set_num_threads(1)
    attn = ParallelAttention(ParallelState.single())
    q, k, v = _inputs(seq)
    attn(q, k, v)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        attn(q, k, v)
        best = min(best, time.perf_counter() - start)
    return best


def time_parallel(layout: dict, seq: int, repeats: int):
    """On every rank: best wall time of one call (max over ranks) and bytes sent."""
    with parallel_state(ParallelConfig(**layout)) as state:
        attn = ParallelAttention(state)
        q, k, v = _inputs(seq, (state.sp.rank, state.sp.size))
        attn(q, k, v)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            attn(q, k, v)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            best = min(best, elapsed.item())
        state.stats.reset()
        attn(q, k, v)
        return best, state.stats.total()


def theory_bytes(kind: str, seq: int, p_u: int, p_r: int) -> float:
    d = HEADS * HEAD_DIM * 4
    ulysses = 4 * seq * d / (p_u * p_r) * (p_u - 1) / p_u if p_u > 1 else 0.0
    # the ring rotates each ulysses group's segment of S/p_r tokens (H/p_u heads)
    ring = 2 * seq * d / p_u * (p_r - 1) / p_r if p_r > 1 else 0.0
    return ulysses + ring


LAYOUTS = {
    "ulysses": lambda p: dict(ulysses_degree=p),
    "ring": lambda p: dict(ring_degree=p),
    "hybrid": lambda p: dict(ulysses_degree=2, ring_degree=p // 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", help="write a PNG of efficiency vs sequence length")
    args = parser.parse_args()

    pools = {p: WorkerPool(p) for p in args.procs}
    rows = []
    try:
        for seq in args.seq:
            t1 = time_single(seq, args.repeats)
            rows.append((seq, "single", 1, t1, 1.0, 0, 0.0))
            for p in args.procs:
                for kind, layout_of in LAYOUTS.items():
                    if kind == "hybrid" and p < 4:
                        continue
                    layout = layout_of(p)
                    results = pools[p].run(time_parallel, layout, seq, args.repeats)
                    tp, sent = results[0][0], max(r[1] for r in results)
                    theory = theory_bytes(
                        kind, seq, layout.get("ulysses_degree", 1), layout.get("ring_degree", 1)
                    )
                    rows.append((seq, kind, p, tp, t1 / (p * tp), sent, theory))
    finally:
        for pool in pools.values():
            pool.close()

    print(f"cores: {os.cpu_count()}, heads x head_dim: {HEADS} x {HEAD_DIM}, fp32, batch 1")
    header = "| seq | layout | P | time (s) | speed-up | efficiency | MiB sent/rank | theory MiB |"
    print(header)
    print("|" + "---|" * 8)
    for seq, kind, p, t, eff, sent, theory in rows:
        t1 = next(r[3] for r in rows if r[0] == seq and r[1] == "single")
        print(
            f"| {seq} | {kind} | {p} | {t:.3f} | {t1 / t:.2f}x | {eff:.0%} | "
            f"{sent / 2**20:.2f} | {theory / 2**20:.2f} |"
        )
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("ulysses", "ring", "hybrid"):
        for p in sorted({r[2] for r in rows if r[1] == kind}):
            pts = [(r[0], r[4]) for r in rows if r[1] == kind and r[2] == p]
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{kind} P={p}")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("strong-scaling efficiency")
    ax.set_xscale("log", base=2)
    ax.legend()
    save(fig, path)


if __name__ == "__main__":
    main()
