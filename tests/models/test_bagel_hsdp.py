"""Bagel under HSDP and tensor parallel: the weights split over the ranks of a replica.

Bagel has no sequence or CFG parallelism, so HSDP's shard group runs every request
redundantly (prefill, every CFG branch, every step on every rank) and only the weights
are split: a rank holds ~1/N of them and all-gathers one unit (a decoder layer with both
experts, a ViT layer, an embedder) just before it runs. Under tensor parallel (TP 2,
``Bagel._tp_plan``) each rank keeps half of every decoder layer (both experts, q/k/v by
heads with the GQA's KV heads, the SwiGLU MLP) and of every SigLIP layer, and the split
layers all-reduce; "TP 2 x Ulysses 2" is TP inside a replica whose Ulysses axis computes
redundantly (each tp group the whole request). The golden cases through the serving
pipeline: t2i case a and the edit case c (its ViT and clean-latent prefill) against the
1-rank run (latents within :data:`LAYOUT_LATENT_TOL`, images within 1/255) and the
official run (README tolerance, 1 level); HSDP: per rank <= 1/2 of the unsharded
parameter bytes + 2%; TP: the decoder's split part is 1/2 per rank, over 0.8 of it.
Pool calls: 2 ranks (HSDP over Ulysses 2, then TP 2 with the VAE split over the same
two ranks), 4 ranks (HSDP over Ring 2 x CFG 2 with TeaCache, then TP 2 x Ulysses 2).
4 ranks with a step cache: also ``test_hsdp.py``.
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
from ithaca.parallel.tensor import parameter_bytes as tp_bytes
from ithaca.testing.distributed import assert_sharded, parallel_state
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
    metadata, ``(parameter bytes, shard world size, shard rank)`` of the network and the
    decoder's tensor-parallel bytes (``split`` / ``replicated`` / ``total``) and the
    latent rows of each VAE decode on this rank."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(CHECKPOINT, state)
        latents = []
        denoise = pipe.denoise

        def recorded(job, *args, **kwargs):
            cancelled = denoise(job, *args, **kwargs)
            latents.append(job.latents[0].float().cpu())
            return cancelled

        pipe.denoise = recorded
        rows = []  # latent rows each decode gives this rank's VAE decoder
        pipe.vae.decoder.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[-2]))
        results = [pipe.generate([r])[0] for r in requests]
        net = pipe.net
        return {
            "latents": latents,
            "images": [np.array(r.images[0]) for r in results if r.images],
            "metadata": [r.metadata for r in results],
            "shard": (parameter_bytes(net), shard_size(net), shard_rank(net)),
            "tp": tp_bytes(pipe.transformer),
            "decoded_rows": rows,
        }


def run_layouts(runs: list[tuple[dict, list]]) -> list[dict]:
    """:func:`run_bagel` of each ``(layout, requests)`` in turn: several cells, one pool call."""
    return [run_bagel(layout, requests) for layout, requests in runs]


def cells(worker_pool, size: int, runs: list[tuple[dict, list]]) -> list[list[dict]]:
    """Per run of ``runs``, every rank's :func:`run_bagel` result (one pool call)."""
    per_rank = worker_pool(size).run(run_layouts, runs)
    return [list(results) for results in zip(*per_rank, strict=True)]


def check_hsdp_bytes(results: list[dict], reference: dict, label: str) -> None:
    """Every rank's bytes <= 1/shard of the unsharded + 2%, the shard ranks all held, a
    group's shards the whole network (``assert_sharded``)."""
    full, size, _ = reference["shard"]
    assert size == 1
    assert_sharded([r["shard"] for r in results], full, results[0]["shard"][1], label)


def check_tp_bytes(results: list[dict], reference: dict, tp: int, label: str) -> None:
    """Every rank: 1/tp of the decoder's split weights and the rest whole (the split part
    over 0.8 of the decoder); the whole network's share is printed."""
    one = reference["tp"]
    assert one["split"] == 0
    for r in results:
        nbytes = r["tp"]
        assert nbytes["split"] * tp + nbytes["replicated"] == one["total"], (label, nbytes)
        assert nbytes["split"] * tp > 0.8 * one["total"], (label, nbytes)
    decoder = results[0]["tp"]["total"] / one["total"]
    network = results[0]["shard"][0] / reference["shard"][0]
    print(f"Bagel {label}: bytes per rank {decoder:.3f} of the decoder, {network:.3f} of all")


def check_bagel(results: list[dict], reference: dict, names, label: str, golden=True) -> None:
    """``results`` (every rank) against the 1-rank ``reference`` and (``golden``) the
    official runs of ``names``: latents on every rank, the returning rank's images."""
    for r in results:  # same request on every rank: same latents everywhere
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
    record("Bagel", label, err, worst)


TP2_SPLIT_VAE = dict(tensor_parallel_size=2, vae_patch_parallel_size=2)
"""TP 2 with the VAE split by rows over the same two ranks (the edit's encode and every
decode: ``ithaca.parallel.vae``, exact), as ``serve -tp 2 --vae-patch-parallel-size 2``."""


@pytest.fixture(scope="module")
def one_rank():
    return run_bagel({}, [golden_request(n) for n in CASES])


def test_two_ranks_hsdp_and_tp2_equal_one_rank_and_the_official_runs(worker_pool, one_rank):
    requests = [golden_request(n) for n in CASES]
    hsdp, tp = cells(worker_pool, 2, [(dict(ulysses_degree=2, use_hsdp=True), requests),
                                      (TP2_SPLIT_VAE, requests)])  # fmt: skip
    check_hsdp_bytes(hsdp, one_rank, "hsdp ulysses2")
    check_bagel(hsdp, one_rank, CASES, "ulysses2 (redundant) (hsdp)")
    check_tp_bytes(tp, one_rank, 2, "tp2")
    check_bagel(tp, one_rank, CASES, "tp2 + vae patch 2")
    halves = [n // 2 for n in one_rank["decoded_rows"]]  # 8 and 14 latent rows on one rank
    assert [r["decoded_rows"] for r in tp] == [halves, halves]  # each rank decodes its half


def test_four_ranks_hsdp_ring_x_cfg_teacache_and_tp2_x_ulysses2(worker_pool, one_rank):
    """One shard group of 4 (ring 2 x cfg 2, neither splitting Bagel's work) + TeaCache:
    every rank skips the same steps (the indicator's sums, all-reduced over the ring
    ranks, are the same full sums on each), latents equal the cached 1-rank run. Then
    TP 2 x Ulysses 2 (the Ulysses pair redundant) on both golden cases."""
    name = "a_t2i_64x64"
    request = golden_request(name, cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.3})
    reference = run_bagel({}, [request])
    assert reference["metadata"][0]["cache"]["cached_steps"] >= 1
    hsdp_layout = dict(ring_degree=2, cfg_parallel_size=2, use_hsdp=True)
    tp_layout = dict(tensor_parallel_size=2, ulysses_degree=2)
    hsdp, tp = cells(worker_pool, 4, [(hsdp_layout, [request]),
                                      (tp_layout, [golden_request(n) for n in CASES])])  # fmt: skip
    cached = {r["metadata"][0]["cache"]["cached_steps"] for r in hsdp}
    assert cached == {reference["metadata"][0]["cache"]["cached_steps"]}, cached
    check_hsdp_bytes(hsdp, reference, "hsdp ring2xcfg2")
    check_bagel(hsdp, reference, [name], "ring2xcfg2+tea_cache (hsdp)", golden=False)
    check_tp_bytes(tp, one_rank, 2, "tp2 x ulysses2")
    check_bagel(tp, one_rank, CASES, "tp2 x ulysses2 (redundant)")


def test_tp_ranks_load_only_their_pieces():
    """``loader.load_weights`` with tensor parallel's ``split_weights`` hook (applied on
    ``meta``): each tp rank holds exactly its pieces of ``ema.safetensors``, read through
    ``read_part``'s sliced reads (both experts, the KV heads, the ViT). No collective: the
    hook reads only ``tp.rank`` / ``tp.size``."""
    import functools
    from types import SimpleNamespace

    from ithaca.models.bagel import loader
    from ithaca.parallel.tensor import split_weights, take

    def load(shard=None):
        return loader.load_weights(loader.build(CHECKPOINT), CHECKPOINT, torch.float32, "cpu",
                                   shard=shard)  # fmt: skip

    whole = dict(load().named_parameters())
    for rank in range(2):
        state = SimpleNamespace(tp=SimpleNamespace(size=2, rank=rank))
        split = load(functools.partial(split_weights, state=state, family="Bagel"))
        assert split.llm.layers[2].self_attn.k_proj_moe_gen.weight.shape == (16, 64)  # 1 KV head
        assert split.vit_model.vision_model.encoder.layers[1].mlp.fc2.weight.shape == (32, 32)
        for name, param in split.named_parameters():
            pieces = split._load_slices.get(name)
            expected = take(whole[name], pieces) if pieces else whole[name]
            assert torch.equal(param, expected), name


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
