"""Tensor parallel (``ithaca.parallel.tensor``): every supported family at TP 2 and
TP 2 x Ulysses 2 equals one rank; so do TP 2 with a step cache (TeaCache, Cache-DiT:
the same skipped steps as one rank with that cache) and TP 2 x data parallel 2 (each
replica); each rank holds ~1/TP of the split weights, loaded split (``split_weights``
on meta: tests/models/test_loading.py measures the peak).

64x64 px, 2 steps, a CFG request, fp32 on gloo. The all-reduce changes the order of the
sums, so latents are compared within fp32 tolerance and images within 1/255. Parameter
bytes: on a TP rank ``split * TP + replicated`` equals the one-rank total exactly, and
the split part is most of the transformer (the replicated rest: norms, modulation,
embeddings, the rowwise biases and the final projection).
"""

from types import SimpleNamespace

import numpy as np
import pytest

from ithaca.config import ParallelConfig
from ithaca.models.flux.pipeline import FluxPipeline
from ithaca.models.longcat_image.pipeline import LongCatImagePipeline
from ithaca.models.ovis_image.pipeline import OvisImagePipeline
from ithaca.models.registry import load_pipeline
from ithaca.models.sd3.pipeline import StableDiffusion3Pipeline
from ithaca.models.z_image.pipeline import ZImagePipeline
from ithaca.parallel import ParallelState
from ithaca.parallel.tensor import DegreeError, check_degree, parameter_bytes, tp_shard
from ithaca.testing.distributed import parallel_state
from ithaca.types import GenerationParams
from tests.models.harness import LAYOUT_LATENT_TOL, max_image_diff, record, world_size

REQUEST = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0, width=64,
               height=64, num_inference_steps=2, seed=3)  # fmt: skip
LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "tp2 x ulysses2": dict(tensor_parallel_size=2, ulysses_degree=2),
    "tp2 x ring2": dict(tensor_parallel_size=2, ring_degree=2),
    "tp2 x cfg2": dict(tensor_parallel_size=2, cfg_parallel_size=2),
    "tp2 x dp2": dict(tensor_parallel_size=2, data_parallel_size=2),
    "tp2 + tea_cache": dict(tensor_parallel_size=2),
    "tp2 + cache_dit": dict(tensor_parallel_size=2),
}
CACHES = {"tea_cache": dict(rel_l1_thresh=0.6), "cache_dit": dict(Fn_compute_blocks=1,
          Bn_compute_blocks=0, max_warmup_steps=0, residual_diff_threshold=10.0)}  # fmt: skip
"""Thresholds that skip steps of the 4-step cached request (asserted on one rank)."""


def cache_of(layout: str) -> str | None:
    return next((c for c in CACHES if layout.endswith(c)), None)


FAMILIES = {
    "FLUX.1": FluxPipeline,
    "LongCat-Image": LongCatImagePipeline,
    "Ovis-Image": OvisImagePipeline,
    "Z-Image": ZImagePipeline,
}


def run(layout: dict, path: str, cache: str | None = None) -> tuple:
    """``(images uint8, final latents fp32 or None, this rank's transformer bytes,
    cache metadata or None)``; with ``cache``, 4 steps with that step cache."""
    request = dict(REQUEST, num_inference_steps=4) if cache else REQUEST
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state, cache_backend=cache, cache_config=CACHES.get(cache))
        captured = {}
        decode = pipe.decode

        def keep(job, latents):
            captured["latents"] = latents.float().cpu()
            return decode(job, latents)

        pipe.decode = keep
        [result] = pipe.generate([GenerationParams(**request)])
        images = [np.asarray(im) for im in result.images]
        pipe.runtime.remove()
        cached = (result.metadata or {}).get("cache")
        return images, captured.get("latents"), parameter_bytes(pipe.transformer), cached


CELLS = [
    *(("Qwen-Image", layout) for layout in LAYOUTS),
    *((name, "tp2") for name in FAMILIES),
    ("Z-Image", "tp2 x ulysses2"),
    ("LongCat-Image", "tp2 x ulysses2"),
]
"""Qwen-Image (joint text) under every layout: Ring and CFG-parallel sit outside the tp
axis, so one family shows they compose. Every family at TP 2. TP 2 x Ulysses 2 also for
Z-Image (30 heads: padded for Ulysses after the TP split) and LongCat-Image (FLUX.1's
processor, shared by FLUX.1 and Ovis-Image, whose plans differ only in entries TP 2
covers; both passed TP 2 x Ulysses 2 too, Ovis 1.7e-6 and 0/255, but cost 2 min each).
Qwen-Image also with each step cache (the cache sees the replicated hidden states, so
every tp rank decides alike) and beside data parallelism (every replica's picture)."""


@pytest.fixture(scope="module")
def one_rank(tiny_checkpoints, tiny_family):
    """``one_rank(family, cache)`` -> ``(checkpoint, run({}, checkpoint, cache))``, once
    per family and cache."""
    runs: dict[tuple, tuple] = {}

    def get(name: str, cache: str | None = None) -> tuple:
        if (name, cache) not in runs:
            path = tiny_checkpoints["t2i"] if name == "Qwen-Image" else tiny_family(FAMILIES[name])
            runs[name, cache] = path, run({}, path, cache)
        return runs[name, cache]

    return get


@pytest.mark.parametrize("name,layout", CELLS, ids=[f"{n}-{lay}" for n, lay in CELLS])
def test_tensor_parallel_matches_one_rank(worker_pool, one_rank, name, layout):
    cache = cache_of(layout)
    path, (ref_images, ref_latents, one_bytes, ref_cache) = one_rank(name, cache)
    if cache:  # the cache really skips steps on one rank
        assert ref_cache["cached_steps"] > 0, ref_cache
    tp = LAYOUTS[layout]["tensor_parallel_size"]
    results = worker_pool(world_size(LAYOUTS[layout])).run(run, LAYOUTS[layout], path, cache)
    returned = [r for r in results if r[0]]  # each data-parallel replica's returning rank
    assert len(returned) == LAYOUTS[layout].get("data_parallel_size", 1)
    for images, latents, _, cached in returned:
        err = (latents - ref_latents).abs().max().item()
        diff = max_image_diff(images, ref_images)
        assert err <= LAYOUT_LATENT_TOL, f"{name} {layout}: latents differ by {err:.2e}"
        assert diff <= 1, f"{name} {layout}: images differ by {diff}/255"
        assert cached == ref_cache  # the same steps skipped (None without a cache)
    record(name, layout, err, diff, cache or "none")
    assert one_bytes["split"] == 0
    for _, _, nbytes, _ in results:  # every rank: 1/TP of the split weights, the rest whole
        assert nbytes["split"] * tp + nbytes["replicated"] == one_bytes["total"]
        assert nbytes["split"] * tp > 0.5 * one_bytes["total"], nbytes
    ratio = results[0][2]["total"] / one_bytes["total"]
    print(f"{name} {layout}: transformer bytes per rank {ratio:.3f} of one rank")


def test_bad_degree_names_the_valid_ones(tiny_checkpoints, tiny_family):
    pipe = load_pipeline(tiny_checkpoints["t2i"], ParallelState.single())
    heads = pipe.transformer.config.num_attention_heads
    bad = next(d for d in range(2, heads + 2) if heads % d)
    with pytest.raises(DegreeError, match=rf"tensor_parallel_size \({bad}\) must divide .*valid"):
        check_degree(pipe.transformer, bad, "Qwen-Image")  # no fallback load catches it
    with pytest.raises(ValueError, match="declares no tensor-parallel plan"):
        sd3 = load_pipeline(tiny_family(StableDiffusion3Pipeline), ParallelState.single())
        check_degree(sd3.transformer, 2, "SD3.5")
    from diffusers import WanTransformer3DModel

    two = SimpleNamespace(tp=SimpleNamespace(size=2))  # what tp_shard reads of the state
    with pytest.raises(DegreeError, match=r"\(2\): WanTransformer3DModel declares no tensor"):
        tp_shard(two, WanTransformer3DModel)  # before a single weight is read
    assert tp_shard(ParallelState.single(), WanTransformer3DModel) is None
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(0\) must be a positive"):
        ParallelConfig(tensor_parallel_size=0)
    assert ParallelConfig(tensor_parallel_size=2, ulysses_degree=2).world_size == 4
