"""Step caches on the toy transformer: exactness at threshold 0, real skipping above
it, and the same skipped steps and latents on every layout as on one rank.

Pyramid: option validation, SCM masks, TaylorSeer and coefficient fitting in-process;
a 10-step CFG loop with each cache on 2-rank gloo groups (ulysses 2, ring 2, cfg 2),
latents within 1e-5 of the 1-rank run with the same cache, patterns identical.
"""

import numpy as np
import pytest
import torch

from ithaca.cache import (
    BlockCacheAdapter,
    TaylorSeer,
    build_cache,
    fit_coefficients,
    scm_mask,
)
from ithaca.config import CacheConfig, ParallelConfig
from ithaca.parallel import (
    ParallelState,
    apply_guidance,
    apply_sequence_parallel,
    predict_branches,
)
from ithaca.testing.distributed import parallel_state
from tests.parallel import toy

STEPS, IMAGE_LEN = 10, 11


def toy_modulated_input(block, args):
    return args["hidden_states"] * (1 + args["modulation"])


TOY_ADAPTER = BlockCacheAdapter(blocks="blocks", modulated_input=toy_modulated_input)


def denoise(state, backend=None, options=None, layers=4):
    """A 10-step CFG flow loop on the toy model; returns (latents, cache stats)."""
    model = toy.ToyTransformer(layers=layers).eval()
    torch.manual_seed(0)
    model = toy.ToyTransformer(layers=layers).eval()
    runtime = None
    if state.sp.size > 1:
        runtime = apply_sequence_parallel(model, toy.PLAN_BLOCK, state)
        for block in model.blocks:
            block.attn = runtime.attention
    cache = None
    if backend:
        config = CacheConfig.from_dict(backend, options)
        cache = build_cache(config, model, TOY_ADAPTER, state, runtime)
        cache.begin(STEPS)
    latents, pos_txt, _, mask = toy.make_inputs(IMAGE_LEN)
    prompts = (pos_txt, torch.zeros_like(pos_txt))
    for i in range(STEPS):
        t = torch.full((latents.shape[0],), 1.0 - i / STEPS)

        def predict(branch, i=i, t=t, latents=latents):
            with torch.no_grad():
                if cache is None:
                    return model(latents, prompts[branch], t, mask)
                with cache.step(i, branch):
                    return model(latents, prompts[branch], t, mask)

        pos, neg = predict_branches(state, predict)
        latents = latents - (1.0 / STEPS) * apply_guidance(pos, neg, 3.0)
    stats = None if cache is None else (cache.stats.as_dict(), cache.stats.pattern)
    return latents, stats


def run_layout(layout, backend, options):
    with parallel_state(ParallelConfig(**layout)) as state:
        return denoise(state, backend, options)


CACHES = {
    "teacache": ("tea_cache", {"rel_l1_thresh": 0.3}),
    "dbcache": ("cache_dit", {"residual_diff_threshold": 0.3, "max_warmup_steps": 2}),
    "dbcache_taylorseer": (
        "cache_dit",
        {
            "residual_diff_threshold": 0.3,
            "max_warmup_steps": 2,
            "Bn_compute_blocks": 1,
            "enable_taylorseer": True,
            "taylorseer_order": 2,
        },
    ),
    "dbcache_scm_static": (
        "cache_dit",
        {"max_warmup_steps": 0, "scm_steps_mask_policy": "fast", "scm_steps_policy": "static"},
    ),
}


@pytest.mark.parametrize("backend,options", CACHES.values(), ids=CACHES.keys())
def test_caches_skip_steps_on_one_rank(backend, options):
    plain, _ = denoise(ParallelState.single())
    cached, (stats, pattern) = denoise(ParallelState.single(), backend, options)
    assert stats["cached_steps"] > 0, pattern
    assert stats["computed_steps"] + stats["cached_steps"] == 2 * STEPS  # two CFG branches
    assert not torch.equal(cached, plain)
    # Skipping approximates: the result stays near the uncached one.
    assert (cached - plain).abs().max() < 0.5


@pytest.mark.parametrize(
    "backend,options",
    [
        ("tea_cache", {"rel_l1_thresh": 0.0}),
        ("cache_dit", {"residual_diff_threshold": 0.0, "max_warmup_steps": 0}),
    ],
)
def test_threshold_zero_equals_uncached_exactly(backend, options):
    plain, _ = denoise(ParallelState.single())
    cached, (stats, _) = denoise(ParallelState.single(), backend, options)
    assert stats["cached_steps"] == 0
    assert torch.equal(cached, plain)


LAYOUTS = {
    "ulysses2": dict(ulysses_degree=2),
    "ring2": dict(ring_degree=2),
    "cfg2": dict(cfg_parallel_size=2),
}


@pytest.mark.parametrize("backend,options", CACHES.values(), ids=CACHES.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_layout_caches_like_one_rank(worker_pool, layout, backend, options):
    reference, (_, ref_pattern) = denoise(ParallelState.single(), backend, options)
    results = worker_pool(2).run(run_layout, layout, backend, options)
    for rank, (latents, (_, pattern)) in enumerate(results):
        err = (latents - reference).abs().max().item()
        assert err <= 1e-5, f"rank {rank}: {err:.2e}"
        if layout.get("cfg_parallel_size", 1) == 1:
            assert pattern == ref_pattern, f"rank {rank} skipped other steps"
        else:  # each cfg rank runs one branch: its pattern is that branch's
            branch = rank
            assert pattern == [p for p in ref_pattern if p[1] == branch]
    assert results[0][1][1] == results[1][1][1] or layout.get("cfg_parallel_size") == 2


def test_options_are_validated():
    config = CacheConfig.from_dict("tea_cache", {"rel_l1_thresh": 0.1, "coefficients": [1, 2]})
    assert hash(config) == hash(CacheConfig("tea_cache", config.options))  # a batching key
    assert config.as_dict() == {"rel_l1_thresh": 0.1, "coefficients": (1, 2)}
    with pytest.raises(ValueError, match="cache_backend"):
        CacheConfig.from_dict("fast_cache", {})
    with pytest.raises(ValueError, match=r"unknown keys \['Fn'\]"):
        CacheConfig.from_dict("cache_dit", {"Fn": 2})
    with pytest.raises(ValueError, match="without a cache_backend"):
        CacheConfig.from_dict(None, {"rel_l1_thresh": 0.1})
    with pytest.raises(ValueError, match="must be a JSON object"):
        CacheConfig.from_dict("tea_cache", [0.1])
    model = toy.make_model()
    state = ParallelState.single()
    with pytest.raises(ValueError, match=r"Bn_compute_blocks \(2\) must be in 0..1"):
        build_cache(
            CacheConfig("cache_dit", (("Bn_compute_blocks", 2),)), model, TOY_ADAPTER, state
        )
    with pytest.raises(ValueError, match="scm_steps_mask_policy"):
        config = CacheConfig("cache_dit", (("scm_steps_mask_policy", "turbo"),))
        build_cache(config, model, TOY_ADAPTER, state)


def test_scm_masks_compute_first_and_last_and_get_sparser():
    for steps in (8, 28, 50):
        masks = {p: scm_mask(p, steps) for p in ("slow", "medium", "fast", "ultra")}
        for mask in masks.values():
            assert len(mask) == steps and mask[0] and mask[-1]
        counts = [sum(masks[p]) for p in ("slow", "medium", "fast", "ultra")]
        assert counts == sorted(counts, reverse=True), counts


def test_taylorseer_extrapolates_from_computed_steps():
    def seer_after(order, f, steps=(0, 2, 4)):
        seer = TaylorSeer(order)
        for step in steps:
            seer.update(torch.tensor(f(step)), step)
        return seer

    linear = lambda s: 3.0 + 2.0 * s  # noqa: E731
    for order in (1, 2):
        assert abs(seer_after(order, linear).predict(7).item() - linear(7)) < 1e-5
    # A quadratic: each order gets closer than the one below (order 0 = plain reuse).
    quad = lambda s: 3.0 + 2.0 * s + 0.5 * s * s  # noqa: E731
    errors = [abs(seer_after(o, quad).predict(6).item() - quad(6)) for o in (0, 1, 2)]
    assert errors[0] > errors[1] > errors[2], errors


def test_fit_coefficients_recovers_a_polynomial():
    x = np.linspace(0.01, 0.5, 30)
    y = 4.0 * x**2 - 0.5 * x + 0.01
    coeffs = fit_coefficients(x, y, degree=2)
    np.testing.assert_allclose(coeffs, [4.0, -0.5, 0.01], atol=1e-8)


def test_removing_a_cache_restores_the_blocks():
    model = toy.make_model()
    cache = build_cache(CacheConfig("tea_cache"), model, TOY_ADAPTER, ParallelState.single())
    assert all("forward" in b.__dict__ for b in model.blocks)
    cache.remove()
    assert all("forward" not in b.__dict__ for b in model.blocks)


def test_calibrator_collects_one_pair_per_step_and_branch_after_the_first():
    from ithaca.cache.calibrate import TeaCacheCalibrator

    torch.manual_seed(0)
    model = toy.ToyTransformer(layers=4).eval()
    calibrator = TeaCacheCalibrator(model, TOY_ADAPTER, ParallelState.single())
    calibrator.begin(STEPS)
    latents, pos_txt, _, mask = toy.make_inputs(IMAGE_LEN)
    for i in range(STEPS):
        t = torch.full((latents.shape[0],), 1.0 - i / STEPS)
        for branch, txt in enumerate((pos_txt, torch.zeros_like(pos_txt))):
            with torch.no_grad(), calibrator.step(i, branch):
                out = model(latents, txt, t, mask)
        latents = latents - out / STEPS
    assert len(calibrator.samples) == 2 * (STEPS - 1)
    x, y = zip(*calibrator.samples, strict=True)
    assert all(v > 0 for v in x + y)
    coefficients = fit_coefficients(x, y, degree=2)
    assert len(coefficients) == 3 and all(np.isfinite(coefficients))
