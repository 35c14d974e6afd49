"""Step-level (continuous) batching through the engine, in process, on a tiny
Qwen-Image checkpoint: a request submitted while another runs joins it at a step
boundary, leaves as soon as its own steps are done (before the longer request), and its
image is within 1/255 of the same request run alone; a request with a step cache joins a
batch with the same cache settings and ends with its solo cached latents (TeaCache,
DBCache with TaylorSeer)."""

import numpy as np
import pytest

from ithaca.engine.engine import Engine
from ithaca.engine.executor import InProcessExecutor, PipelineSpec
from ithaca.types import GenerationParams


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    path = tiny_checkpoints["t2i"]
    engine = Engine(
        [InProcessExecutor(PipelineSpec(path))], max_batch_size=4, batch_wait_ms=0,
        continuous=True,
    )  # fmt: skip
    engine.start()
    yield engine
    engine.shutdown()


def P(steps, seed, **kw):
    return GenerationParams("a red cat", width=32, height=32, num_inference_steps=steps,
                            seed=seed, **kw)  # fmt: skip


def test_request_joins_a_running_batch_and_leaves_first(engine):
    late: list = []
    order: list[str] = []

    def on_progress(step, total, previews):
        if step == 2 and not late:  # the long request is running: submit a short one
            late.append(engine.submit(P(2, seed=9, true_cfg_scale=2.5, negative_prompt="x")))
            late[0].future.add_done_callback(lambda f: order.append("short"))

    long = engine.submit(P(6, seed=1, negative_prompt="x"), on_progress=on_progress)
    long.future.add_done_callback(lambda f: order.append("long"))
    result = long.future.result(timeout=300)
    short = late[0].future.result(timeout=300)
    assert order == ["short", "long"]
    assert short.metadata["batching"]["joined_at_batch_step"] == 2
    assert result.metadata["batching"]["joined_at_batch_step"] == 0
    assert late[0].started < long.finished  # it did not wait for the batch to end
    alone = engine.executors[0].pipeline.generate(
        [P(2, seed=9, true_cfg_scale=2.5, negative_prompt="x", request_id="solo")]
    )[0]
    diff = np.abs(np.asarray(short.images[0], int) - np.asarray(alone.images[0], int)).max()
    assert diff <= 1


def test_continuous_batching_settings_are_checked():
    from ithaca.config import ServerConfig

    assert ServerConfig(executor="inprocess", continuous_batching=True).continuous_batching
    assert ServerConfig(continuous_batching=True).continuous_batching  # worker groups too
    with pytest.raises(ValueError, match="batch_invariant"):
        ServerConfig(executor="inprocess", continuous_batching=True, batch_invariant=True)


def test_batch_invariant_reaches_every_rank():
    from ithaca.engine.executor import spec_from_json, spec_to_json

    for flag in (False, True):
        spec, _ = spec_from_json(spec_to_json(PipelineSpec(batch_invariant=flag), 1.0))
        assert spec.batch_invariant is flag


def test_a_cached_request_joins_a_batch_with_its_cache_settings(engine):
    from ithaca.runtime.stepping import Accepts, join_key

    pipe = engine.executors[0].pipeline
    key = join_key(pipe, pipe.resolve(P(6, seed=1)))
    accepts = Accepts(pipe, key)
    assert accepts(P(2, seed=9)) and not accepts(GenerationParams("x", width=64, height=64))
    cached = P(2, seed=9, cache_backend="tea_cache")  # other cache settings: not this batch
    assert not accepts(cached)
    resolved = engine.executors[0].validate(cached)
    assert resolved["join_key"] is not None and not accepts(cached, resolved)
    cached_key = join_key(pipe, pipe.resolve(P(6, seed=1, cache_backend="tea_cache")))
    assert Accepts(pipe, cached_key)(cached, resolved)
    assert engine.executors[0].validate(P(2, seed=9))["join_key"] == key


CACHES = {
    "tea_cache": {"rel_l1_thresh": 0.6},
    "cache_dit": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1, "enable_taylorseer": True},
}


@pytest.mark.parametrize("backend", CACHES)
def test_a_cached_request_joining_at_step_2_gets_its_solo_cached_result(
    engine, monkeypatch, backend
):
    """Each request keeps its own cache state in the step batch: the joiner's final
    latents and skip counts are its solo run's, though the two requests are at different
    steps and (the gathered-rows path ran) decided differently at some step."""
    from ithaca.cache.base import StepCache
    from ithaca.runtime.stepping import generate_stepwise

    pipe = engine.executors[0].pipeline
    kw = dict(negative_prompt="x", cache_backend=backend, cache_config=CACHES[backend])
    head, joiner = P(6, seed=1, request_id="head", **kw), P(5, seed=2, request_id="joiner", **kw)
    latents: dict = {}
    decode, call_rows, mixed = pipe.final_decode, StepCache.call_rows, []

    def recording(job, *args, **kwargs):  # one row per request here
        for i, r in enumerate(job.requests):
            latents[(phase[0], r.params.request_id)] = job.latents[i : i + 1].clone()
        return decode(job, *args, **kwargs)

    def counting(self, *args):
        mixed.append(1)
        return call_rows(self, *args)

    monkeypatch.setattr(pipe, "final_decode", recording)
    monkeypatch.setattr(StepCache, "call_rows", counting)
    boundaries: list = []

    def admit(accepts):
        boundaries.append(1)
        return [joiner] if len(boundaries) == 2 and accepts(joiner) else []

    phase = ["batch"]
    batched = {r.request_id: r for r in generate_stepwise(pipe, [head], admit=admit)}
    assert batched["joiner"].metadata["batching"]["joined_at_batch_step"] == 2
    assert mixed, "the two requests never decided differently"
    phase[0] = "solo"
    for params in (head, joiner):
        solo = pipe.generate([params])[0]
        rid = params.request_id
        assert batched[rid].metadata["cache"] == solo.metadata["cache"], rid
        assert batched[rid].metadata["cache"]["cached_steps"] > 0, rid
        err = (latents[("batch", rid)] - latents[("solo", rid)]).abs().max().item()
        assert err <= 1e-6, f"{rid}: {err:.2e}"
        diff = np.abs(np.asarray(batched[rid].images[0], int) - np.asarray(solo.images[0], int))
        assert diff.max() <= 1, rid
