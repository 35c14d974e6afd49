"""Qwen-Image-Layered with Cache-DiT (DBCache) under every layout, against 1 rank cached.

Pyramid: the layered pipeline's own checks (1 rank vs diffusers, uncached layouts) are in
test_qwen_image_layered.py; here 2- and 4-rank gloo runs with the cache on: final
latents within 1e-4, layers within 1/255, and the cache skipped steps.
"""

from __future__ import annotations

import pytest

from tests.models.harness import check_layout, generate, record, world_size
from tests.models.test_qwen_image_layered import CFG, checkpoint  # noqa: F401 - fixture

LAYOUTS = {
    "ulysses2": dict(ulysses_degree=2),
    "ring2": dict(ring_degree=2),
    "cfg2": dict(cfg_parallel_size=2),
    "hybrid2x2": dict(ulysses_degree=2, ring_degree=2),
}
CACHED = dict(CFG, num_inference_steps=6, cache_backend="cache_dit",
              cache_config={"residual_diff_threshold": 0.5, "max_warmup_steps": 2})  # fmt: skip


@pytest.fixture(scope="module")
def one_rank_cached(checkpoint):  # noqa: F811 - the imported fixture
    return generate({}, checkpoint, [CACHED])


@pytest.mark.parametrize("name", LAYOUTS)
def test_cache_dit_layout_equals_one_rank(worker_pool, checkpoint, one_rank_cached, name):  # noqa: F811
    layout = LAYOUTS[name]
    results = worker_pool(world_size(layout)).run(generate, layout, checkpoint, [CACHED])
    err, diff = check_layout(results, one_rank_cached)
    reference_stats = one_rank_cached[2]["metadata"][0]["cache"]
    stats = results[0][2]["metadata"][0]["cache"]
    assert stats["backend"] == "cache_dit" and stats["cached_steps"] > 0, stats
    assert stats["cached_steps"] == reference_stats["cached_steps"]
    record("Qwen-Image-Layered", name, err, diff, "cache_dit")
