"""HSDP overhead: time per denoising step with and without weight sharding, in one run.

Builds a FLUX.1-shaped checkpoint (the tiny family's encoders and VAE, a transformer of
``--layers`` double + single blocks at ``--heads`` x 64) and, on a pool of P gloo ranks,
times the same request under each layout twice - unsharded and with ``use_hsdp`` -
printing seconds per step (median over ``--repeats`` requests, max over ranks), the ratio,
and each rank's parameter bytes (:func:`ithaca.parallel.hsdp.parameter_bytes`).

HSDP adds one all-gather of every block's weights per forward. On this CPU the ranks
share 2 cores and gloo all-gathers are synchronous, so the ratio here is an upper
bound; on GPUs FSDP2 overlaps block ``i+1``'s all-gather with block ``i``'s compute.
On a GPU node the ranks compute on ``cuda:RANK`` (the pool's groups are gloo, so the
collectives are not NCCL's: for NCCL figures time ``ithaca serve --use-hsdp`` with
``benchmarks/serving.py``).

    python benchmarks/hsdp.py                         # P=2: ulysses2, ring2, cfg2
    python benchmarks/hsdp.py --layers 8 --heads 16 --size 256 --steps 4
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import options

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.parallel.hsdp import parameter_bytes
from ithaca.testing.distributed import WorkerPool, parallel_state
from ithaca.types import GenerationParams

LAYOUTS = {
    "ulysses2": dict(ulysses_degree=2),
    "ring2": dict(ring_degree=2),
    "cfg2": dict(cfg_parallel_size=2),
}


def build_checkpoint(root: Path, layers: int, heads: int) -> str:
    """The tiny FLUX.1 checkpoint with a bigger transformer in place of the tiny one."""
    from diffusers import FluxTransformer2DModel

    from ithaca.testing.tiny_families import TEXT_HIDDEN, build_tiny_flux

    path = build_tiny_flux(root / "flux")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN, guidance_embeds=True, axes_dims_rope=(16, 24, 24),
    )  # fmt: skip
    transformer.save_pretrained(path / "transformer")
    return str(path)


def time_layout(layout: dict, path: str, size: int, steps: int, repeats: int):
    """On every rank: (median seconds per step, parameter bytes of the transformer)."""
    torch.set_num_threads(1)
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        params = GenerationParams(prompt="a red cat", negative_prompt="blurry",
                                  true_cfg_scale=4.0, width=size, height=size,
                                  num_inference_steps=steps, seed=0)  # fmt: skip
        pipe.generate([params])  # warm-up
        per_step = []
        for _ in range(repeats):
            result = pipe.generate([params])[0]
            per_step.append(result.metadata["timings"]["denoise_s"] / steps)
        held = parameter_bytes(pipe.transformer)
        pipe.runtime.remove()
        return statistics.median(per_step), held


def main() -> None:
    parser = options(__doc__, layers=4, heads=8, size=128, steps=4, repeats=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp), args.layers, args.heads)
        pool = WorkerPool(2, start_timeout=900)
        try:
            rows = []
            for name in args.layouts.split(","):
                times = {}
                for hsdp in (False, True):
                    layout = dict(LAYOUTS[name], use_hsdp=hsdp)
                    started = time.perf_counter()
                    out = pool.run(time_layout, layout, path, args.size, args.steps,
                                   args.repeats, timeout=1800)  # fmt: skip
                    times[hsdp] = (max(t for t, _ in out), max(b for _, b in out))
                    print(f"  {name} hsdp={hsdp}: {time.perf_counter() - started:.0f} s wall")
                rows.append((name, times))
        finally:
            pool.close()
    print(f"\nFLUX.1-shaped transformer, {args.layers}+{args.layers} blocks, "
          f"{args.heads}x64 hidden, {args.size}x{args.size} px, {args.steps} steps, CFG on, "
          f"2 ranks\n")  # fmt: skip
    print("| layout | s/step unsharded | s/step HSDP | ratio | MB/rank unsharded | MB/rank HSDP |")
    print("|---|---|---|---|---|---|")
    for name, t in rows:
        (base, base_bytes), (hsdp, hsdp_bytes) = t[False], t[True]
        print(f"| {name} | {base:.3f} | {hsdp:.3f} | {hsdp / base:.2f}x | "
              f"{base_bytes / 2**20:.1f} | {hsdp_bytes / 2**20:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
