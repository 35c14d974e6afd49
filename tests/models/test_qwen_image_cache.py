"""Step caches inside the Qwen-Image pipeline, under every layout.

Pyramid: cache mechanics on a toy model in tests/cache; here the real pipeline on a
tiny checkpoint, 8 steps with true CFG: threshold 0 equals the uncached images bit
for bit, a real threshold skips steps, and ulysses 2 / ring 2 / cfg 2 reproduce the
1-rank cached images (within 1/255) with the same skipped steps on every rank.
"""

import numpy as np
import pytest

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.testing.distributed import parallel_state
from ithaca.types import GenerationParams
from tests.models.harness import check_cache_layout, generate_cached, record

REQUEST = dict(prompt="a red cat on a mat", negative_prompt="blurry", true_cfg_scale=4.0,
               width=80, height=80, num_inference_steps=8, seed=5)  # fmt: skip

CACHES = {
    "teacache": ("tea_cache", {"rel_l1_thresh": 0.6}),
    "dbcache_taylorseer": (
        "cache_dit",
        {"residual_diff_threshold": 0.5, "max_warmup_steps": 2, "enable_taylorseer": True},
    ),
}


def run_with_latents(layout: dict, path: str, backend=None, options=None, request=None):
    """Generate on every rank: (image, metadata) on rank 0, the pattern on all, and rank
    0's final latents fp32 (None elsewhere)."""
    result, pattern, latents = generate_cached(layout, path, request or REQUEST, backend, options)
    image = np.asarray(result.images[0]) if result.images else None
    return image, result.metadata, pattern, latents


def run(layout: dict, path: str, backend=None, options=None, request=None):
    """``run_with_latents`` without the latents."""
    return run_with_latents(layout, path, backend, options, request)[:3]


@pytest.fixture(scope="module")
def uncached(tiny_checkpoints):
    return run({}, tiny_checkpoints["t2i"])


@pytest.mark.parametrize(
    "backend,options",
    [
        ("tea_cache", {"rel_l1_thresh": 0.0}),
        ("cache_dit", {"residual_diff_threshold": 0.0, "max_warmup_steps": 0}),
    ],
)
def test_threshold_zero_is_the_uncached_image(tiny_checkpoints, uncached, backend, options):
    image, meta, _ = run({}, tiny_checkpoints["t2i"], backend, options)
    assert meta["cache"]["cached_steps"] == 0
    assert np.array_equal(image, uncached[0])


@pytest.mark.parametrize("backend,options", CACHES.values(), ids=CACHES.keys())
def test_cache_skips_steps_and_reports_it(tiny_checkpoints, uncached, backend, options):
    image, meta, pattern = run({}, tiny_checkpoints["t2i"], backend, options)
    stats = meta["cache"]
    assert stats["backend"] == backend
    assert stats["cached_steps"] > 0 and stats["computed_steps"] + stats["cached_steps"] == 16
    assert stats["hit_ratio"] == pytest.approx(stats["cached_steps"] / 16, abs=1e-4)
    assert len(pattern) == 16
    assert not np.array_equal(image, uncached[0])  # skipping changed something


def test_request_overrides_the_server_cache(tiny_checkpoints, uncached):
    request = dict(REQUEST, cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.0})
    image, meta, _ = run({}, tiny_checkpoints["t2i"], "tea_cache", {"rel_l1_thresh": 0.6}, request)
    assert meta["cache"]["cached_steps"] == 0
    assert np.array_equal(image, uncached[0])


LAYOUTS = {
    "ulysses2": dict(ulysses_degree=2),
    "ring2": dict(ring_degree=2),
    "cfg2": dict(cfg_parallel_size=2),
}


@pytest.mark.parametrize("backend,options", CACHES.values(), ids=CACHES.keys())
@pytest.mark.parametrize("name", LAYOUTS)
def test_layouts_cache_like_one_rank(worker_pool, tiny_checkpoints, name, backend, options):
    path, layout = tiny_checkpoints["t2i"], LAYOUTS[name]
    err, diff = check_cache_layout(worker_pool, run_with_latents, path, layout, backend, options)
    record("Qwen-Image", name, err, diff, cache=backend)


def test_unknown_cache_options_fail_before_loading(tiny_checkpoints):
    with pytest.raises(ValueError, match="unknown keys"):
        run({}, tiny_checkpoints["t2i"], "tea_cache", {"thresh": 0.1})


def test_calibration_fits_coefficients_that_teacache_then_uses(tiny_checkpoints, tmp_path):
    import json
    import shutil

    from ithaca.calibrate import calibrate_teacache

    coefficients, samples = calibrate_teacache(
        tiny_checkpoints["t2i"], prompts=["a red cat", "a blue bird"], steps=4, width=64, height=64
    )
    assert len(samples) == 2 * 3  # two prompts, one branch, every step after the first
    assert len(coefficients) == 5 and all(np.isfinite(coefficients))
    # A checkpoint carrying them in ithaca.json gets them as its TeaCache default.
    path = tmp_path / "calibrated"
    shutil.copytree(tiny_checkpoints["t2i"], path)
    (path / "ithaca.json").write_text(json.dumps({"teacache_coefficients": coefficients}))
    with parallel_state(ParallelConfig()) as state:
        pipe = load_pipeline(str(path), state, cache_backend="tea_cache")
        pipe.generate([GenerationParams(**dict(REQUEST, num_inference_steps=2))])
        assert pipe.step_cache.coefficients == tuple(coefficients)


def test_calibrate_teacache_command_writes_ithaca_json(tiny_checkpoints, tmp_path, capsys):
    import json
    import shutil

    from ithaca.cli import main

    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["t2i"], path)
    argv = ["calibrate-teacache", str(path), "--num-inference-steps", "3", "--width", "64",
            "--height", "64", "--degree", "2", "--write"]  # fmt: skip
    for prompt in ("a red cat", "a blue bird", "a green tree"):
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[1])
    stored = json.loads((path / "ithaca.json").read_text())
    assert stored["teacache_coefficients"] == printed["teacache_coefficients"]
    assert len(stored["teacache_coefficients"]) == 3
