"""Image quality of accelerated configurations against the plain output of the shapes model.

The shipped shapes model (or ``--model``) generates N held-out prompts plainly: one
process, ``--steps`` steps, no cache. Then each configuration generates the same
prompts with the same seeds, and the table gives, per configuration, PSNR and SSIM
against the plain images (mean and worst), prompt adherence (every attribute right,
:mod:`tools.shapes.analysis`) and seconds per image.

Configurations (comma-separated ``--configs``):

    ulysses2, ring2, ulysses4, ring4, hybrid2x2, cfg2   parallel layouts (gloo ranks)
    steps=K                                             K steps instead of --steps
    cache=NAME                                          cache_backend NAME (with --cache-config)

    python benchmarks/quality.py --n 16 --configs ulysses2,ring2,steps=10
    python benchmarks/quality.py --configs cache=teacache --cache-config '{"thresh": 0.2}'

Parallel layouts should be bit-near-identical (PSNR > 50 dB); step caches trade PSNR
for time. On a machine with fewer cores than ranks the timings measure overhead only.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.models.shapes import shipped_checkpoint_path
from ithaca.parallel.state import ParallelState
from ithaca.testing.distributed import WorkerPool, parallel_state
from ithaca.types import GenerationParams
from tools.shapes import analysis
from tools.shapes.evaluate import heldout_cases

LAYOUTS = {
    "ulysses2": dict(ulysses_degree=2),
    "ring2": dict(ring_degree=2),
    "ulysses4": dict(ulysses_degree=4),
    "ring4": dict(ring_degree=4),
    "hybrid2x2": dict(ulysses_degree=2, ring_degree=2),
    "cfg2": dict(cfg_parallel_size=2),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian filter over the first two axes, 'valid' region only."""
    t = np.arange(-radius, radius + 1)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    # (H, W, C) -> convolve rows then columns
    x = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 0, x)
    return np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, x)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels (Gaussian window 11, sigma 1.5; Wang et al. 2004)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_blur(a), _gaussian_blur(b)
    var_a = _gaussian_blur(a * a) - mu_a**2
    var_b = _gaussian_blur(b * b) - mu_b**2
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def _params(prompts, seeds, steps, cfg, cache=None, cache_config=None):
    return [
        GenerationParams(prompt=p, seed=s, width=128, height=128, num_inference_steps=steps,
                         true_cfg_scale=cfg, negative_prompt=" " if cfg > 1 else None,
                         cache_backend=cache, cache_config=cache_config)
        for p, s in zip(prompts, seeds, strict=True)
    ]  # fmt: skip


def generate_layout(layout: dict, model: str, prompts, seeds, steps, cfg):
    """On every rank of a pool: images (rank 0 only) and wall seconds."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(model, state)
        start = time.perf_counter()
        results = pipe.generate(_params(prompts, seeds, steps, cfg))
        seconds = time.perf_counter() - start
        images = [np.asarray(r.images[0]) for r in results if r.images]
        pipe.runtime.remove()
        return images, seconds


def generate_local(model: str, prompts, seeds, steps, cfg, cache=None, cache_config=None):
    pipe = load_pipeline(model, ParallelState.single(), cache_backend=cache,
                         cache_config=cache_config)  # fmt: skip
    start = time.perf_counter()
    results = pipe.generate(_params(prompts, seeds, steps, cfg, cache, cache_config))
    return [np.asarray(r.images[0]) for r in results], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the shipped shapes model)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--configs", default="ulysses2,ring2,steps=10")
    p.add_argument("--cache-config", type=json.loads, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = args.model or shipped_checkpoint_path()
    cases = heldout_cases(args.n)
    prompts, seeds = [c.prompt for c in cases], [c.seed for c in cases]

    def adherence(images):
        from PIL import Image

        pairs = zip(images, cases, strict=True)
        verdicts = [analysis.check(Image.fromarray(im), c.scene) for im, c in pairs]
        return analysis.accuracy(verdicts)["all"]

    plain, t_plain = generate_local(model, prompts, seeds, args.steps, args.cfg)
    rows = [("plain", float("inf"), float("inf"), 1.0, 1.0, adherence(plain), t_plain)]
    pools: dict[int, WorkerPool] = {}
    try:
        for name in args.configs.split(","):
            if name in LAYOUTS:
                layout = LAYOUTS[name]
                world = int(np.prod([v for v in layout.values()]))
                pool = pools.get(world) or pools.setdefault(world, WorkerPool(world))
                images, t = pool.run(
                    generate_layout, layout, model, prompts, seeds, args.steps, args.cfg
                )[0]
            elif name.startswith("steps="):
                images, t = generate_local(model, prompts, seeds, int(name[6:]), args.cfg)
            elif name.startswith("cache="):
                images, t = generate_local(
                    model, prompts, seeds, args.steps, args.cfg, name[6:], args.cache_config
                )
            else:
                raise ValueError(f"unknown configuration {name!r}")
            ps = [psnr(a, b) for a, b in zip(images, plain, strict=True)]
            ss = [ssim(a, b) for a, b in zip(images, plain, strict=True)]
            rows.append((name, np.mean(ps), min(ps), np.mean(ss), min(ss), adherence(images), t))
    finally:
        for pool in pools.values():
            pool.close()
    print(f"{args.n} held-out prompts, 128x128, {args.steps} steps, cfg {args.cfg}, model {model}")
    print(f"{'config':<12} {'PSNR dB':>8} {'worst':>7} {'SSIM':>7} {'worst':>7} "
          f"{'adherent':>8} {'s/image':>8}")  # fmt: skip
    for name, pm, pw, sm, sw, adh, t in rows:
        print(f"{name:<12} {pm:>8.2f} {pw:>7.2f} {sm:>7.4f} {sw:>7.4f} {adh:>8.0%} "
              f"{t / args.n:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
