"""Step-level (continuous) batching through the engine, in process, on a tiny
Qwen-Image checkpoint: a request submitted while another runs joins it at a step
boundary, leaves as soon as its own steps are done (before the longer request), and its
image is within 1/255 of the same request run alone; a request with a step cache never
joins (its validated ``join_key`` is None)."""

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
    from ithaca.engine.worker import spec_from_json, spec_to_json

    for flag in (False, True):
        spec, _ = spec_from_json(spec_to_json(PipelineSpec(batch_invariant=flag), 1.0))
        assert spec.batch_invariant is flag


def test_a_request_with_a_step_cache_never_joins(engine):
    from ithaca.models.stepping import Accepts, join_key

    pipe = engine.executors[0].pipeline
    key = join_key(pipe, pipe.resolve(P(6, seed=1)))
    accepts = Accepts(pipe, key)
    assert accepts(P(2, seed=9)) and not accepts(GenerationParams("x", width=64, height=64))
    cached = P(2, seed=9, cache_backend="tea_cache")  # its accumulators are per run
    assert not accepts(cached)
    resolved = engine.executors[0].validate(cached)
    assert resolved["join_key"] is None and not accepts(cached, resolved)
    assert engine.executors[0].validate(P(2, seed=9))["join_key"] == key
