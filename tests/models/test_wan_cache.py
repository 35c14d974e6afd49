"""Step caches on Wan2.2's two experts, one cache per expert, under every layout.

8 steps cross the expert boundary, so both experts' caches work. Threshold 0 equals
the uncached video bit for bit; real thresholds skip steps of each expert; ulysses 2,
ring 2 and cfg 2 reproduce the 1-rank cached frames (within 1/255) with the same
skipped steps on every rank.
"""

import numpy as np
import pytest

from tests.models.harness import FAMILIES, check_cache_layout, generate_cached, record

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


def run_with_latents(layout: dict, path: str, backend=None, options=None):
    """(frames, metadata, pattern, rank 0's final latents fp32 or None elsewhere)."""
    result, pattern, latents = generate_cached(layout, path, T2V, backend, options)
    return result.frames, result.metadata, pattern, latents


def run(layout: dict, path: str, backend=None, options=None):
    """``run_with_latents`` without the latents."""
    return run_with_latents(layout, path, backend, options)[:3]


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
    err, diff = check_cache_layout(worker_pool, run_with_latents, t2v, layout, backend, options)
    record(FAMILIES["t2v_a14b"], name, err, diff, cache=backend)
