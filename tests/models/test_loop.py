"""The shared denoising loop: no host sync per step, resume from a step, one rule per field.

Pyramid: in-process, one rank, the tiny Qwen-Image checkpoint (64 px, 2-4 steps). Each
check is exact where the computation is the same by construction (a resumed loop runs
the same kernels on the same tensors), a count where it counts host reads.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.runtime.checkpoint import ResumeState
from ithaca.types import GenerationParams, ParamError

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
"""Tensor methods that read a value back to the host (a device sync on CUDA)."""


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints["t2i"], ParallelState.single())


@contextlib.contextmanager
def count_host_reads(counts: list[str]):
    """Record every host read of a tensor's value while active (a sync on CUDA)."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            counts.append(name)
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _job(pipe, steps: int, **extra):
    params = GenerationParams(
        prompt="a red cat",
        negative_prompt="blurry",
        width=64,
        height=64,
        num_inference_steps=steps,
        seed=3,
        **extra,
    )
    requests = [pipe.resolve(params)]
    return pipe.prepare(requests, pipe.conditions(requests))


def test_the_loop_reads_nothing_back_per_step(pipe):
    # The whole loop (CFG branches, guidance, scheduler step, step callback) for 2 and
    # for 4 steps: equal counts mean zero host reads per step.
    reads = {}
    for steps in (2, 4):
        job = _job(pipe, steps)
        counts: list[str] = []
        with count_host_reads(counts):
            pipe.denoise(job, callback=lambda event: False)
        reads[steps] = counts
    assert reads[4] == reads[2], reads


def test_the_counter_sees_a_host_read():
    counts: list[str] = []
    with count_host_reads(counts):
        bool(torch.ones(1) > 0)
        torch.ones(1).item()
    assert counts == ["__bool__", "item"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_resume_at_step_k_equals_an_uninterrupted_run(pipe, k):
    whole = _job(pipe, 4)
    assert pipe.denoise(whole) is None

    # Stop after k steps (the callback cancels; one rank stops at once) ...
    first = _job(pipe, 4)
    assert pipe.denoise(first, callback=lambda event: event.step == k) == k
    # ... and resume a fresh job from there: the same kernels on the same tensors.
    second = _job(pipe, 4)
    pipe.denoise(second, resume=ResumeState(k, first.latents.clone()))
    assert torch.equal(second.latents, whole.latents)


def test_resume_step_out_of_range(pipe):
    job = _job(pipe, 2)
    with pytest.raises(ValueError, match=r"resume step \(3\) must be in \[0, 2\]"):
        pipe.denoise(job, resume=ResumeState(3, job.latents))


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=-1), "num_inference_steps"),
        (dict(prompt=""), "prompt"),
        (dict(num_images=0), "n"),
        (dict(true_cfg_scale=-1.0), "true_cfg_scale"),  # the numbers' rules: every family's
        (dict(flow_shift=0.0), "flow_shift"),
        (dict(fps=2.5), "fps"),
        (dict(layers=2), "layers"),
        (dict(width=8), "size"),
        (dict(cache_backend="fast_cache"), "cache_backend"),
        (dict(cache_backend="tea_cache", cache_config={"Fn": 1}), "cache_config"),
    ],
)
def test_bad_settings_name_their_param(pipe, params, param):
    with pytest.raises(ParamError) as info:
        pipe.resolve(GenerationParams(**{"prompt": "x", **params}))
    assert info.value.param == param
    assert isinstance(info.value, ValueError)  # what the engine and server catch


def test_a_step_batch_reads_nothing_back_per_step(pipe):
    # Step-level batching: two requests with their own steps and scales in one batch.
    # After the first step (which builds the members' inputs), steps read nothing back.
    from ithaca.runtime.stepping import StepBatch

    batch = [
        GenerationParams("a red cat", negative_prompt="x", width=64, height=64, seed=s,
                         num_inference_steps=n, true_cfg_scale=g, request_id=str(s))
        for s, n, g in ((1, 4, 4.0), (2, 5, 2.5))
    ]  # fmt: skip
    stepper = StepBatch(pipe, callback=lambda event: False, admit=None, on_done=None)
    stepper.start([pipe.resolve(p) for p in batch])
    stepper.step()
    scales = stepper.scale  # per-row scales: copied to the device once per membership
    counts: list[str] = []
    with count_host_reads(counts):
        for _ in range(2):
            stepper.step()
    assert counts == []
    assert scales is not None and stepper.scale is scales
    assert [s.step for s in stepper.slots] == [3, 3]
