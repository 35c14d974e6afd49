"""Bagel under HSDP: the weights split over a replica whose ranks each run the whole request.

Bagel has no sequence or CFG parallelism, so HSDP's shard group runs every request
redundantly (prefill, every CFG branch, every step on every rank) and only the weights
are split: a rank holds ~1/N of them and all-gathers one unit (a decoder layer with both
experts, a ViT layer, an embedder) just before it runs. The golden cases through the
serving pipeline: 2 ranks (t2i case a and the edit case c, with its ViT and clean-latent
prefill) against the 1-rank run (latents within :data:`LAYOUT_LATENT_TOL`, images within
1/255) and the official run (README tolerance, 1 level); per rank <= 1/2 of the
unsharded parameter bytes + 2%. 4 ranks with a step cache: ``test_hsdp.py``'s pool cell.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.parallel.hsdp import get_fully_shard_rank as shard_rank
from ithaca.parallel.hsdp import get_fully_shard_world_size as shard_size
from ithaca.parallel.hsdp import parameter_bytes
from ithaca.testing.distributed import parallel_state
from tests.models._bagel_golden import (
    CHECKPOINT,
    assert_close,
    golden_request,
    image_levels,
    load_case,
    requires_golden,
)
from tests.models.harness import LAYOUT_LATENT_TOL, record

pytestmark = requires_golden
CASES = ("a_t2i_64x64", "c_edit_112x224")


def run_bagel(layout: dict, requests: list) -> dict:
    """On this rank: each request's final latent tokens and image (returning rank only),
    metadata, and ``(parameter bytes, shard world size, shard rank)`` of the network."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(CHECKPOINT, state)
        latents = []
        denoise = pipe._denoise

        def recorded(*args, **kwargs):
            x, cancelled = denoise(*args, **kwargs)
            latents.append(x.float().cpu())
            return x, cancelled

        pipe._denoise = recorded
        results = [pipe.generate([r])[0] for r in requests]
        net = pipe.net
        return {
            "latents": latents,
            "images": [np.array(r.images[0]) for r in results if r.images],
            "metadata": [r.metadata for r in results],
            "shard": (parameter_bytes(net), shard_size(net), shard_rank(net)),
        }


def check_bagel(results: list[dict], reference: dict, names, label: str, golden=True) -> None:
    """Sharded ``results`` (every rank) against the 1-rank ``reference`` and (``golden``)
    the official runs of ``names``; every rank's bytes <= 1/shard of the unsharded + 2%."""
    full, size, _ = reference["shard"]
    assert size == 1
    shard = results[0]["shard"][1]
    held = sorted(r["shard"][2] for r in results)
    assert held == sorted(list(range(shard)) * (len(results) // shard)), held
    for r in results:  # same request on every rank: same latents everywhere
        assert r["shard"][0] <= full / shard * 1.02, (label, r["shard"], full)
        for ours, ref in zip(r["latents"], reference["latents"], strict=True):
            err = float((ours - ref).abs().max())
            assert err <= LAYOUT_LATENT_TOL, f"Bagel {label}: latents differ by {err:.2e}"
    images = results[0]["images"]
    assert len(images) == len(names) and all(not r["images"] for r in results[1:])
    worst = 0
    for name, ours, one, latent in zip(names, images, reference["images"], results[0]["latents"],
                                       strict=True):  # fmt: skip
        worst = max(worst, int(np.abs(ours.astype(int) - one.astype(int)).max()))
        if not golden:
            continue
        _, ref = load_case(name)
        assert_close(latent, ref["final.latent_tokens"], f"{label} {name}")
        levels, share = image_levels(torch.from_numpy(ours), ref["final.image_uint8"])
        assert levels <= 1 and share <= 0.001, (name, levels, share)
    assert worst <= 1, f"Bagel {label}: images differ from 1 rank by {worst}/255"
    err = max(float((a - b).abs().max()) for a, b in
              zip(results[0]["latents"], reference["latents"], strict=True))  # fmt: skip
    record("Bagel", f"{label} (hsdp)", err, worst)


@pytest.fixture(scope="module")
def one_rank():
    return run_bagel({}, [golden_request(n) for n in CASES])


def test_two_ranks_hsdp_equals_one_rank_and_the_official_runs(worker_pool, one_rank):
    layout = dict(ulysses_degree=2, use_hsdp=True)
    results = worker_pool(2).run(run_bagel, layout, [golden_request(n) for n in CASES])
    check_bagel(results, one_rank, CASES, "ulysses2 (redundant)")


def test_four_ranks_ring_x_cfg_with_teacache_equals_one_rank(worker_pool):
    """One shard group of 4 (ring 2 x cfg 2, neither splitting Bagel's work) + TeaCache:
    every rank skips the same steps (the indicator's sums, all-reduced over the ring
    ranks, are the same full sums on each), latents equal the cached 1-rank run."""
    name = "a_t2i_64x64"
    request = golden_request(name, cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.3})
    reference = run_bagel({}, [request])
    assert reference["metadata"][0]["cache"]["cached_steps"] >= 1
    layout = dict(ring_degree=2, cfg_parallel_size=2, use_hsdp=True)
    results = worker_pool(4).run(run_bagel, layout, [request])
    cached = {r["metadata"][0]["cache"]["cached_steps"] for r in results}
    assert cached == {reference["metadata"][0]["cache"]["cached_steps"]}, cached
    check_bagel(results, reference, [name], "ring2xcfg2+tea_cache", golden=False)


def test_units_must_cover_every_parameter():
    import torch.nn as nn

    from ithaca.parallel.hsdp import declared_units

    class Half(nn.Module):
        _hsdp_units = ("a",)

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"leaves 2 parameter\(s\) unsharded, e.g. \['b.weight'"):
        declared_units(Half())
    Half._hsdp_units = ("a", "b")
    assert len(declared_units(Half())) == 2
