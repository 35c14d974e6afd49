"""The engine over the in-process executor (the twin of the torchrun worker group)."""

import threading
import time

import numpy as np
import pytest

from ithaca.engine.engine import Engine
from ithaca.engine.errors import (
    DrainingError,
    EngineDeadError,
    GenerationFailedError,
    QueueFullError,
    RequestCancelledError,
)
from ithaca.engine.executor import InProcessExecutor, PipelineSpec
from ithaca.parallel.state import ParallelState
from ithaca.types import GenerationParams
from tests.engine.doubles import FakePipeline


def make_engine(step_s=0.0, **kw):
    pipe = FakePipeline(ParallelState.single())
    pipe.step_s = step_s
    engine = Engine([InProcessExecutor(PipelineSpec(), pipeline=pipe)], **kw)
    engine.start(timeout=10)
    return engine, pipe


def P(seed=0, size=32, steps=3, **kw):
    return GenerationParams(
        "a cat", width=size, height=size, num_inference_steps=steps, seed=seed, **kw
    )


def pixels(result):
    return [np.asarray(im) for im in result.images]


def test_batched_requests_get_exactly_the_images_they_get_alone():
    engine, pipe = make_engine(max_batch_size=4, batch_wait_ms=300)
    try:
        alone = [pixels(engine.generate(P(seed))) for seed in range(4)]
        assert pipe.calls == [1, 1, 1, 1]
        reqs = [engine.submit(P(seed)) for seed in range(4)]
        batched = [pixels(r.future.result(10)) for r in reqs]
        assert pipe.calls[4:] == [4]  # one forward pass for all four
        for a, b in zip(alone, batched, strict=True):
            assert np.array_equal(a[0], b[0])
        assert not np.array_equal(alone[0][0], alone[1][0])  # seeds matter
        assert engine.metrics.batch_size.collect()[0].samples  # recorded
    finally:
        engine.shutdown()


def test_progress_reports_every_step_with_previews():
    engine, _ = make_engine()
    seen = []
    try:
        req = engine.submit(P(steps=3, partial_images=2), lambda s, t, p: seen.append((s, t, p)))
        req.future.result(10)
        assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
        assert all(p is not None and p[0].size == (32, 32) for _, _, p in seen)
    finally:
        engine.shutdown()


def test_cancel_stops_a_running_request_between_steps():
    engine, _ = make_engine(step_s=0.1)
    try:
        started = threading.Event()
        req = engine.submit(P(steps=50), lambda s, t, p: started.set())
        assert started.wait(5)
        t0 = time.monotonic()
        engine.cancel(req)
        with pytest.raises(RequestCancelledError):
            req.future.result(5)
        assert time.monotonic() - t0 < 1.0  # within a couple of 0.1 s steps, not 5 s
        assert req.step < 10
    finally:
        engine.shutdown()


def test_cancel_while_queued_fails_at_once():
    engine, pipe = make_engine(step_s=0.1, max_batch_size=1)
    try:
        running = engine.submit(P(steps=5))
        queued = engine.submit(P(seed=1, steps=5))
        engine.cancel(queued)
        with pytest.raises(RequestCancelledError):
            queued.future.result(0.1)
        running.future.result(5)
        assert pipe.calls == [1]
    finally:
        engine.shutdown()


def test_pipeline_value_error_is_the_users_fault():
    engine, _ = make_engine()
    try:
        with pytest.raises(GenerationFailedError) as info:
            engine.generate(P(size=24))
        assert info.value.status == 400 and "multiple of 16" in str(info.value)
        assert engine.generate(P()).images  # the engine keeps serving
    finally:
        engine.shutdown()


def test_queue_full_and_drain():
    engine, _ = make_engine(step_s=0.05, max_queue_size=1, max_batch_size=1)
    try:
        running = engine.submit(P(steps=10))
        time.sleep(0.1)  # let it leave the queue
        queued = engine.submit(P(seed=1, steps=2))
        with pytest.raises(QueueFullError):
            engine.submit(P(seed=2))
        engine.begin_drain()
        assert not engine.ready and engine.alive
        with pytest.raises(DrainingError):
            engine.submit(P(seed=3))
    finally:
        engine.shutdown(drain_timeout=10)
    assert running.future.result(0).images and queued.future.result(0).images


class _Dies(InProcessExecutor):
    """An executor whose 'ranks' die on their first batch (and serve after a restart)."""

    died = False

    def execute(self, batch, on_step, deadlines=None):
        if self.died:
            return super().execute(batch, on_step)
        self.died = True
        self._closed = True
        from ithaca.engine.errors import WorkerGroupDiedError

        raise WorkerGroupDiedError("rank 1 was killed")


def test_dead_group_fails_running_and_queued_requests_then_restarts():
    pipe = FakePipeline(ParallelState.single())
    ex = _Dies(PipelineSpec(), pipeline=pipe)
    engine = Engine([ex], max_batch_size=1)
    engine.start(timeout=10)
    try:
        a = engine.submit(P())
        with pytest.raises(EngineDeadError):
            a.future.result(5)
        deadline = time.monotonic() + 5
        while not engine.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.alive and engine.metrics.restarts._value.get() == 1
    finally:
        engine.shutdown()


def test_on_worker_failure_exit_calls_on_fatal():
    reasons = []
    ex = _Dies(PipelineSpec(), pipeline=FakePipeline(ParallelState.single()))
    engine = Engine([ex], on_worker_failure="exit", on_fatal=reasons.append, max_batch_size=1)
    engine.start(timeout=10)
    try:
        with pytest.raises(EngineDeadError):
            engine.generate(P(), timeout=5)
        deadline = time.monotonic() + 5
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reasons and "rank 1 was killed" in reasons[0]
        with pytest.raises(EngineDeadError):
            engine.submit(P())
    finally:
        engine.shutdown()


def test_data_parallel_groups_share_the_queue_and_survive_each_other():
    pipes = [FakePipeline(ParallelState.single()) for _ in range(2)]
    for p in pipes:
        p.step_s = 0.05
    dies = _Dies(PipelineSpec(), name="group-1", pipeline=pipes[1])
    engine = Engine(
        [InProcessExecutor(PipelineSpec(), name="group-0", pipeline=pipes[0]), dies],
        max_batch_size=1,
    )
    engine.start(timeout=10)
    try:
        # Different sizes cannot batch: the two groups take turns from one queue.
        reqs = [engine.submit(P(size=16 * (i + 2), steps=4)) for i in range(6)]
        outcomes = []
        for r in reqs:
            try:
                outcomes.append(r.future.result(10).images[0].size)
            except EngineDeadError:
                outcomes.append("dead")
        # group-1 dies on its first batch: that request alone fails (group-0 is alive, so
        # the queue is kept); both groups serve the rest after group-1's restart.
        assert outcomes.count("dead") == 1, outcomes
        assert len(pipes[0].calls) >= 1 and len(pipes[0].calls) + len(pipes[1].calls) == 5
    finally:
        engine.shutdown()


def test_generate_cli_writes_images_and_mp4_offline(tmp_path):
    from PIL import Image as PILImage

    from ithaca.cli import main

    png = tmp_path / "cat.png"
    args = ["generate", "--model", "tests.engine.doubles:make_pipeline", "--prompt", "a cat"]
    args += ["--width", "48", "--height", "32", "--num-inference-steps", "2", "--seed", "1"]
    assert main([*args, "--num-images", "2", "--output", str(png)]) == 0
    assert PILImage.open(png).size == (48, 32) and (tmp_path / "cat_1.png").exists()
    edit = tmp_path / "edit.webp"
    assert main([*args, "--image", str(png), "--output", str(edit)]) == 0
    assert PILImage.open(edit).format == "WEBP"
    mp4 = tmp_path / "clip.mp4"
    assert main([*args, "--num-frames", "5", "--fps", "4", "--output", str(mp4)]) == 0
    import av

    with av.open(str(mp4)) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == 5
