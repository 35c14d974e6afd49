"""Step caches on Wan2.2's two experts, one cache per expert, under every layout.

8 steps cross the expert boundary, so both experts' caches work. Threshold 0 equals
the uncached video bit for bit; real thresholds skip steps of each expert; ulysses 2,
ring 2 and cfg 2 reproduce the 1-rank cached frames (within 1/255) with the same
skipped steps on every rank.
"""

import numpy as np
import pytest

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.testing.distributed import parallel_state
from ithaca.types import GenerationParams
from tests.models.harness import FAMILIES, record

T2V = dict(
    prompt="a red cat walks on a blue street",
    negative_prompt="blurry",
    num_frames=5,
    width=48,
    height=48,
    num_inference_steps=8,
    guidance_scale=4.0,
    guidance_scale_2=2.0,
    seed=3,
)
LAYOUTS = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2),
           "cfg2": dict(cfg_parallel_size=2)}  # fmt: skip
CACHES = {
    "teacache": ("tea_cache", {"rel_l1_thresh": 0.8}),
    "dbcache": ("cache_dit", {"residual_diff_threshold": 0.6, "max_warmup_steps": 1}),
}


def run(layout: dict, path: str, backend=None, options=None, latents=None):
    """(frames, metadata, pattern); ``latents``, a list, receives rank 0's final latents."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state, cache_backend=backend, cache_config=options)
        if latents is not None:
            decode = pipe.decode
            pipe.decode = lambda job, x: (latents.append(x.float().cpu()), decode(job, x))[1]
        result = pipe.generate([GenerationParams(**T2V)])[0]
        pattern = pipe._cache.stats.pattern if pipe._cache is not None else []
        for runtime in pipe.runtimes:
            runtime.remove()
        return result.frames, result.metadata, pattern


def run_with_latents(layout: dict, path: str, backend, options):
    """``run``, and rank 0's final latents fp32 (None elsewhere)."""
    latents: list = []
    return (*run(layout, path, backend, options, latents), latents[0] if latents else None)


@pytest.fixture(scope="module")
def t2v(tiny_wan):
    return tiny_wan["t2v_a14b"]


@pytest.fixture(scope="module")
def uncached(t2v):
    return run({}, t2v)


def test_threshold_zero_is_the_uncached_video(t2v, uncached):
    frames, meta, _ = run({}, t2v, "tea_cache", {"rel_l1_thresh": 0.0})
    assert meta["cache"]["cached_steps"] == 0 and meta["cache"]["computed_steps"] == 16
    assert np.array_equal(frames, uncached[0])


@pytest.mark.parametrize("backend,options", CACHES.values(), ids=CACHES.keys())
def test_each_expert_skips_steps(t2v, uncached, backend, options):
    frames, meta, pattern = run({}, t2v, backend, options)
    assert meta["cache"]["cached_steps"] > 0
    steps = {step for step, _, cached in pattern if cached}
    assert steps, pattern
    assert len(pattern) == 16  # 8 steps x 2 branches, over both experts
    assert not np.array_equal(frames, uncached[0])


@pytest.mark.parametrize("backend,options", CACHES.values(), ids=CACHES.keys())
@pytest.mark.parametrize("name", LAYOUTS)
def test_layouts_cache_like_one_rank(worker_pool, t2v, name, backend, options):
    layout = LAYOUTS[name]
    ref_frames, ref_meta, ref_pattern, ref_latents = run_with_latents({}, t2v, backend, options)
    results = worker_pool(2).run(run_with_latents, layout, t2v, backend, options)
    frames, meta, _, latents = results[0]
    diff = int(np.abs(frames.astype(int) - ref_frames.astype(int)).max())
    assert diff <= 1, f"frames differ by {diff}/255"
    assert meta["cache"] == ref_meta["cache"]
    err = (latents - ref_latents).abs().max().item()
    assert err <= 1e-4, f"final latents differ by {err:.2e}"
    record(FAMILIES["t2v_a14b"], name, err, diff, cache=backend)
    for rank, (_, _, pattern, _) in enumerate(results):
        if layout.get("cfg_parallel_size", 1) == 2:
            assert pattern == [p for p in ref_pattern if p[1] == rank]
        else:
            assert pattern == ref_pattern
