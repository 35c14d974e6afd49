"""Qwen-Image-Edit, -Edit-2509, -Edit-2511 and Qwen-Image-2512, proven like Qwen-Image;
Qwen-Image-Layered with Cache-DiT.

Pyramid: 1 rank vs diffusers (no processes); every layout (Ulysses 2, Ring 2, CFG 2,
hybrid 2x2) and both step caches under Ulysses 2, Ring 2 and CFG 2, against our 1-rank
run with the same cache, on 2- and 4-rank gloo pools. The 2509 and 2511 requests carry
two input images, so every layout runs a multi-image edit. Tolerances as the other model
tests: latents 1e-5 vs diffusers (images equal), 1e-4 between layouts (images within
1/255). The layout cells (ours against ours) edit at a 128x128 px area (``EDIT_AREA``)
instead of diffusers' 1024x1024: the input images' VAE encode and their tokens in every
forward were most of each cell's time, and every layout and cache path is the same at
either area; the diffusers cells keep diffusers' area. Tiny checkpoints: -2511 is the
-2509 (Edit-Plus) architecture with the transformer's ``zero_cond_t`` on (the input
images' tokens modulated at t = 0, as the 2511 release configures it); -2512 is the
Qwen-Image architecture with other weights.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ithaca.testing.tiny import build_tiny_qwen_image
from ithaca.types import GenerationParams
from tests.models.harness import EDIT_AREA, check_layout, generate, record, world_size
from tests.models.test_qwen_image import edit_images, run_ours, run_reference

LAYOUTS = {
    "ulysses2": dict(ulysses_degree=2),
    "ring2": dict(ring_degree=2),
    "cfg2": dict(cfg_parallel_size=2),
    "hybrid2x2": dict(ulysses_degree=2, ring_degree=2),
}
CACHES = {
    "tea_cache": {"rel_l1_thresh": 0.6},
    "cache_dit": {"residual_diff_threshold": 0.5, "max_warmup_steps": 2},
}
CACHE_LAYOUTS = ["ulysses2", "ring2", "cfg2"]
FAMILIES = {"Qwen-Image-Edit": 1, "Qwen-Image-Edit-2509": 2, "Qwen-Image-Edit-2511": 2,
            "Qwen-Image-2512": 0}  # fmt: skip
"""Family -> input images per request."""


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("edit-family")
    plus_2511 = root / "edit_2511"
    shutil.copytree(tiny_checkpoints["edit_plus"], plus_2511)
    config_path = plus_2511 / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["zero_cond_t"] = True
    config_path.write_text(json.dumps(config, indent=2))
    return {
        "Qwen-Image-Edit": tiny_checkpoints["edit"],
        "Qwen-Image-Edit-2509": tiny_checkpoints["edit_plus"],
        "Qwen-Image-Edit-2511": str(plus_2511),
        "Qwen-Image-2512": str(build_tiny_qwen_image(root / "t2i_2512", "t2i", seed=1)),
    }


def request(family: str, steps: int = 2, **extra) -> dict:
    n = FAMILIES[family]
    return dict(prompt="make it red", negative_prompt=" ", true_cfg_scale=4.0, width=96,
                height=64, num_inference_steps=steps, seed=5, images=edit_images()[:n],
                request_id=family, **extra)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_one_rank_equals_diffusers(checkpoints, family):
    params = GenerationParams(**request(family, steps=3))
    ref_images, ref_latents = run_reference(checkpoints[family], params)
    results, latents = run_ours(checkpoints[family], [params])
    err = (latents[-1] - ref_latents).abs().max().item()
    assert err <= 1e-5, f"latents differ by {err:.2e}"
    ours = np.stack([np.asarray(im) for im in results[0].images])
    assert ours.shape == ref_images.shape == (1, 64, 96, 3)
    assert np.array_equal(ours, ref_images)
    record(family, "1 rank vs diffusers", err, 0)


def test_2511_modulates_the_input_images_differently(checkpoints):
    # zero_cond_t changes the result: the 2511 checkpoint is not the 2509 one renamed.
    # The same request (two input images) on both: the layout cells' 1-rank runs.
    a = one_rank(checkpoints, "Qwen-Image-Edit-2509", None)[1][0]
    b = one_rank(checkpoints, "Qwen-Image-Edit-2511", None)[1][0]
    assert (a - b).abs().max().item() > 1e-3


_one_rank: dict = {}


def one_rank(checkpoints, family: str, cache: str | None):
    key = (family, cache)
    if key not in _one_rank:
        extra = {} if cache is None else dict(cache_backend=cache, cache_config=CACHES[cache])
        steps = 2 if cache is None else 6
        batch = [request(family, steps, **extra)]
        _one_rank[key] = generate({}, checkpoints[family], batch, EDIT_AREA)
    return _one_rank[key]


SHARDED = ["pos_embed[0]", "transformer_blocks.0.hidden_states"]


def _check(worker_pool, checkpoints, family, name, cache):
    layout = LAYOUTS[name]
    reference = one_rank(checkpoints, family, cache)
    batch = [request(family, 2 if cache is None else 6)]
    if cache is not None:
        batch[0].update(cache_backend=cache, cache_config=CACHES[cache])
    pool = worker_pool(world_size(layout))
    results = pool.run(generate, layout, checkpoints[family], batch, EDIT_AREA)
    hooks = {}
    if "ulysses_degree" in layout or "ring_degree" in layout:
        sharded = list(SHARDED)
        if family == "Qwen-Image-Edit-2511":
            sharded.append("transformer_blocks.0.modulate_index")
        hooks = dict(sharded=sharded, gathered=["proj_out[0]"])
    try:
        err, diff = check_layout(results, reference, **hooks)
    except AssertionError as exc:  # the 2511 plan may shard modulate_index at every block
        if "modulate_index" not in str(exc):
            raise
        err, diff = check_layout(results, reference, gathered=["proj_out[0]"])
        for _, _, info in results:
            assert info["sharded"][:2] == SHARDED
    if cache is not None:
        stats = results[0][2]["metadata"][0]["cache"]
        assert stats["cached_steps"] > 0, stats  # the cache did skip work
    record(family, name, err, diff, cache or "none")


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_layout_equals_one_rank(worker_pool, checkpoints, family, name):
    _check(worker_pool, checkpoints, family, name, None)


@pytest.mark.parametrize("name", CACHE_LAYOUTS)
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_layout_equals_cached_one_rank(worker_pool, checkpoints, family, cache, name):
    _check(worker_pool, checkpoints, family, name, cache)
