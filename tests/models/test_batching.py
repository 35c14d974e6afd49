"""Fused and step-level (continuous) batching against solo runs, for every image family.

Pyramid: in-process, one rank, tiny checkpoints (the spec's recipe), 2-4 steps. Per
family:

- fused (the default): each request of a fused batch within 1/255 of its solo run
  (latents within 1e-4), and with ``fuse_batches = False`` (``--batch-invariant``)
  exactly its solo bytes;
- step-level batching, every request at step 0: exactly the fused result (same forward
  inputs, the timestep row-wise equal, the scheduler step row-wise; bit-identical by
  construction);
- a request that joins mid-run with its own step count, guidance scale and seed: within
  1/255 of its solo run, and the running requests stay within 1/255 of theirs.

Multi-rank joins (the decision broadcast) are checked in ``test_batching_parallel.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ithaca.models.flux.pipeline import FluxPipeline
from ithaca.models.longcat_image.pipeline import LongCatImagePipeline
from ithaca.models.ovis_image.pipeline import OvisImagePipeline
from ithaca.models.registry import load_pipeline
from ithaca.models.sd3.pipeline import StableDiffusion3Pipeline
from ithaca.models.z_image.pipeline import ZImagePipeline
from ithaca.parallel import ParallelState
from ithaca.runtime.stepping import generate_stepwise
from ithaca.types import GenerationParams

SMALL = dict(width=28, height=20)
FAMILIES = {
    "FLUX.1": (FluxPipeline, SMALL),
    "SD3.5": (StableDiffusion3Pipeline, SMALL),
    "Ovis-Image": (OvisImagePipeline, SMALL),
    "LongCat-Image": (LongCatImagePipeline, SMALL),
    "Z-Image": (ZImagePipeline, SMALL),
    "Qwen-Image": (None, dict(width=32, height=32)),
}


def requests(size: dict) -> dict[str, GenerationParams]:
    """Two requests that start together and one that joins later with its own step
    count, CFG scale, seed and two images."""
    common = dict(negative_prompt="blurry", **size)
    return {
        "a": GenerationParams("a red cat", num_inference_steps=2, true_cfg_scale=4.0, seed=1,
                              request_id="a", **common),
        "b": GenerationParams("a small blue bird near a tree", num_inference_steps=2,
                              true_cfg_scale=4.0, seed=2, request_id="b", **common),
        "c": GenerationParams("a green house", num_inference_steps=3, true_cfg_scale=2.5,
                              seed=3, num_images=2, request_id="c", **common),
    }  # fmt: skip


def run(pipe, batch, stepwise=False, admit=None):
    """``{request_id: (final latents fp32, images uint8)}`` and the results' metadata."""
    captured: dict[str, torch.Tensor] = {}
    decode = pipe.decode

    def record(job, latents):
        start = 0
        for r in job.requests:
            n = r.params.num_images
            captured[r.params.request_id] = latents[start : start + n].float().clone()
            start += n
        return decode(job, latents)

    pipe.decode = record
    try:
        results = generate_stepwise(pipe, batch, admit=admit) if stepwise else pipe.generate(batch)
    finally:
        del pipe.decode
    out = {
        r.request_id: (captured[r.request_id], np.stack([np.asarray(i) for i in r.images]))
        for r in results
    }
    return out, {r.request_id: r.metadata for r in results}


def assert_within(ours, solo, name):
    (lat, img), (lat_ref, img_ref) = ours, solo
    torch.testing.assert_close(lat, lat_ref, atol=1e-4, rtol=1e-4, msg=f"{name} latents")
    diff = np.abs(img.astype(int) - img_ref.astype(int)).max()
    assert diff <= 1, f"{name}: images differ by {diff}/255"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_family, tiny_checkpoints):
    cls, size = FAMILIES[request.param]
    path = tiny_checkpoints["t2i"] if cls is None else tiny_family(cls)
    pipe = load_pipeline(path, ParallelState.single())
    reqs = requests(size)
    solo = {k: run(pipe, [p])[0][k] for k, p in reqs.items()}
    yield request.param, pipe, reqs, solo
    pipe.runtime.remove()


def test_fused_within_one_level_of_solo_and_invariant_mode_exact(family):
    name, pipe, reqs, solo = family
    assert pipe.fuse_batches  # the default
    fused, _ = run(pipe, [reqs["a"], reqs["b"]])
    for k in "ab":
        assert_within(fused[k], solo[k], f"{name} fused {k}")
    pipe.fuse_batches = False
    try:
        exact, _ = run(pipe, [reqs["a"], reqs["b"]])
    finally:
        pipe.fuse_batches = True
    for k in "ab":
        assert torch.equal(exact[k][0], solo[k][0]), f"{name} batch-invariant {k}"
        assert np.array_equal(exact[k][1], solo[k][1])


def test_stepwise_from_step_zero_equals_fused(family):
    name, pipe, reqs, _ = family
    fused, _ = run(pipe, [reqs["a"], reqs["b"]])
    stepwise, meta = run(pipe, [reqs["a"], reqs["b"]], stepwise=True)
    for k in "ab":
        assert meta[k]["batching"] == {"mode": "continuous", "joined_at_batch_step": 0}
        assert torch.equal(stepwise[k][0], fused[k][0]), f"{name} {k}"
        assert np.array_equal(stepwise[k][1], fused[k][1])


def test_request_joining_mid_run_matches_its_solo_run(family):
    name, pipe, reqs, solo = family
    boundaries = []

    def admit(accepts):
        boundaries.append(len(boundaries) + 1)
        if len(boundaries) == 1:  # after step 1 of a and b
            assert accepts(reqs["c"])
            assert not accepts(GenerationParams("x", width=64, height=64))  # other size
            return [reqs["c"]]
        return []

    out, meta = run(pipe, [reqs["a"], reqs["b"]], stepwise=True, admit=admit)
    assert meta["c"]["batching"]["joined_at_batch_step"] == 1
    assert meta["c"]["num_inference_steps"] == 3 and meta["c"]["true_cfg_scale"] == 2.5
    assert boundaries == [1, 2, 3, 4]  # after each step; a, b leave after 2, c after 1 + 3
    for k in "abc":
        assert_within(out[k], solo[k], f"{name} joined {k}")
