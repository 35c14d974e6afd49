"""VAE patch parallelism: decode time and per-rank peak activation at 1 / 2 / 4 ranks.

    python benchmarks/vae.py                       # AutoencoderKL + Wan VAE, gloo on CPU
    python benchmarks/vae.py --rows 45 --cols 40   # another latent size

Random-weight VAEs with the layer layout of the FLUX / SD3 ``AutoencoderKL`` (four
stages, GroupNorm, mid-block attention; narrower channels) and the Wan2.1 causal 3D VAE
(``base_dim`` 32), decoding a latent whose height divides by neither 2 nor 4. Every
layout runs in the same pool of 4 gloo ranks (one thread each): ``N`` ranks decode, the
others wait at a barrier. Columns: wall time of the decode (median of ``--repeat``),
the largest activation one layer of a rank holds (inputs + output, forward hooks:
:class:`ithaca.parallel.vae.ActivationPeak`) and its ratio to one rank's, halo bytes a
rank sent, and the largest difference to the one-rank picture. On a 2-core machine
4 ranks share 2 cores: the time column shows the overhead, the memory column the point.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from ithaca.config import ParallelConfig
from ithaca.parallel.vae import ActivationPeak, run_split
from ithaca.testing.distributed import WorkerPool, parallel_state


def _vae(kind: str):
    from diffusers import AutoencoderKL, AutoencoderKLWan

    torch.manual_seed(0)
    if kind == "AutoencoderKL":
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=16,
        ).eval()
    return AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def measure(kind: str, rows: int, cols: int, frames: int, repeat: int) -> list[dict]:
    """On every rank of the pool: each layout's time, peak and error (rank 0's row)."""
    vae = _vae(kind)
    shape = (1, 16, rows, cols) if kind == "AutoencoderKL" else (1, 16, frames, rows, cols)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    decode = lambda x: vae.decode(x).sample  # noqa: E731
    out, reference = [], None
    for size in (1, 2, 4):
        config = ParallelConfig(ulysses_degree=dist.get_world_size(), vae_patch_parallel_size=size)
        with parallel_state(config) as state, torch.no_grad():
            active = state.rank < size  # the first VAE group decodes; the others wait
            times, peak, picture = [], 0, None
            for _ in range(repeat if active else 0):
                state.stats.reset()
                with ActivationPeak(vae) as hooks:
                    started = time.perf_counter()
                    picture = run_split(vae, decode, z, state.vae)
                    times.append(time.perf_counter() - started)
                peak = hooks.peak
            dist.barrier()
            if not active:
                continue
            if size == 1:  # rank 0 keeps the one-rank picture; its row is the one printed
                reference = picture
            out.append(
                {
                    "ranks": size,
                    "time_s": statistics.median(times),
                    "peak_bytes": peak,
                    "halo_bytes": state.stats.bytes_sent.get("p2p", 0),
                    "max_err": (picture - reference).abs().max().item() if state.rank == 0 else 0,
                    "picture": tuple(picture.shape),
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=33, help="latent height (9 x 4 - 3)")
    parser.add_argument("--cols", type=int, default=40)
    parser.add_argument("--frames", type=int, default=3, help="Wan latent frames")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pool = WorkerPool(4)
    try:
        print("| VAE | picture | ranks | decode s | vs 1 rank | peak act. MiB / rank "
              "| vs 1 rank | halo MiB sent / rank | max abs diff |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for kind in ("AutoencoderKL", "AutoencoderKLWan"):
            rows = pool.run(measure, kind, args.rows, args.cols, args.frames, args.repeat)[0]
            one = rows[0]
            for r in rows:
                print(
                    f"| {kind} | {'x'.join(map(str, r['picture'][2:]))} | {r['ranks']} "
                    f"| {r['time_s']:.2f} | {one['time_s'] / r['time_s']:.2f}x "
                    f"| {r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / one['peak_bytes']:.2f} "
                    f"| {r['halo_bytes'] / 2**20:.2f} | {r['max_err']:.1e} |"
                )
    finally:
        pool.close()


if __name__ == "__main__":
    main()
