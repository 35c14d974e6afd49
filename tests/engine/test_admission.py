"""The cost model: units from tokens and images, rates measured per group, deadlines,
admission, and the overdue signal ``/health`` reports."""

import time

import pytest

from ithaca.config import ParallelConfig
from ithaca.engine.admission import Cost, CostModel, admit, batch_cost, cost_of
from ithaca.engine.errors import AdmissionError
from ithaca.engine.executor import PipelineSpec
from ithaca.engine.group import WorkerGroupExecutor
from ithaca.engine.ipc import ChannelClosed
from ithaca.engine.session import RunningBatch, Session
from ithaca.types import GenerationParams, StepEvent
from tests.server.harness import FAKE


def test_units_grow_with_tokens_images_and_guidance():
    small = Cost(512, 512, 20)  # 32 x 32 = 1024 tokens
    assert small.tokens == 1024
    assert small.units == pytest.approx(1024 + 1024**2 / 16384)
    assert Cost(512, 512, 20, images=2, branches=2).units == pytest.approx(4 * small.units)
    video = Cost(64, 64, 4, frames=9)  # 3 latent frames of 4 x 4 tokens
    assert video.tokens == 48 and video.pixels == 9 * 64 * 64
    two = batch_cost(
        [cost_of(GenerationParams("a", width=64, height=64, num_images=n)) for n in (1, 3)]
    )
    assert two.images == 4


def test_estimates_and_deadlines_follow_the_measurements():
    model = CostModel(factor=10.0, floor_s=5.0, fallback_s=300.0)
    cost = Cost(1024, 1024, 10)
    assert model.seconds(cost) is None and model.deadlines(cost).step_s == 300.0
    model.observe_step(cost, 2.0)  # 2 s per step at 1024 x 1024
    model.observe_decode(cost, 4.0)
    model.observe_memory(cost, 2**30)
    assert model.seconds(cost) == pytest.approx(10 * 2.0 + 4.0)
    d = model.deadlines(cost)
    assert (d.step_s, d.decode_s) == (pytest.approx(20.0), pytest.approx(40.0))
    assert d.overdue_step_s == pytest.approx(5.0) and d.overdue_decode_s == pytest.approx(9.0)
    big = Cost(4096, 4096, 2)  # 16x the tokens: with attention, 64x the step work
    assert model.step_seconds(big) / 2.0 == pytest.approx(big.units / cost.units)
    assert model.deadlines(big).step_s > 10 * 72  # a 72 s step is slow, not hung
    assert model.memory_bytes(big) == pytest.approx(16 * 2**30)
    tiny = Cost(64, 64, 2)
    assert model.deadlines(tiny).step_s == 5.0  # never below the floor


def test_admit_refuses_by_time_and_by_memory_only_once_measured():
    model = CostModel()
    cost = Cost(1024, 1024, 10)
    admit([model], cost, max_seconds=1.0, max_bytes=2**20)  # nothing measured: admitted
    model.observe_step(cost, 0.5)
    with pytest.raises(AdmissionError, match="about 5 s") as exc:
        admit([model], cost, max_seconds=1.0, max_bytes=None)
    assert exc.value.status == 400 and exc.value.param == "size"
    model.observe_memory(cost, 2**30)  # 1 GiB at 1024 x 1024
    admit([model], Cost(1024, 1024, 1), max_seconds=10.0, max_bytes=2 * 2**30)
    with pytest.raises(AdmissionError, match=r"4\.0 GiB"):
        admit([model], Cost(2048, 2048, 1), max_seconds=10.0, max_bytes=2 * 2**30)


def test_overdue_step_turns_health_503_before_the_group_is_declared_hung():
    group = WorkerGroupExecutor(PipelineSpec(FAKE, parallel=ParallelConfig(ulysses_degree=2)))
    model = CostModel(factor=10.0, floor_s=5.0)
    model.observe_step(Cost(64, 64, 4), 0.05)  # 50 ms a step: overdue after 1.1 s, hung after 5 s
    deadlines = model.deadlines(Cost(64, 64, 4))
    group._dead.clear()  # as if started: only the running batch's clock matters here
    group._batch = RunningBatch(0, lambda event: False, deadlines)
    group._batch.last_progress -= 60  # before the first step (prompt encoding): fixed 300 s
    assert not group.overdue() and group._batch.limits(300.0) == (300.0, 300.0)
    group._batch.stepped = True
    group._batch.last_progress += 60
    assert not group.overdue()
    group._batch.last_progress -= deadlines.overdue_step_s + 0.1
    assert group.overdue() and group.describe()["status"] == "step_overdue"
    _, hung_after = group._batch.limits(300.0)
    assert hung_after == deadlines.step_s > deadlines.overdue_step_s


def test_decode_reporting_chunks_is_alive_past_the_whole_decode_deadline():
    model = CostModel(factor=10.0, floor_s=1.0)
    cost = Cost(64, 64, 4)
    model.observe_step(cost, 0.05)
    model.observe_decode(cost, 4.0)  # 4 s a decode: the whole decode is hung after 40 s
    d = model.deadlines(cost)
    assert d.decode_s == pytest.approx(40.0) and d.expected_decode_s == pytest.approx(4.0)
    # 8 chunks of 0.5 s expected: overdue after 2 s, hung after 5 s without a chunk.
    assert d.decode_limits(8) == (pytest.approx(2.0), pytest.approx(5.0))
    assert d.decode_limits(0) == (d.overdue_decode_s, d.decode_s)  # no chunks reported yet
    batch = RunningBatch(0, lambda event: False, d)
    batch.stepped, t = True, 1000.0
    batch.decoded(8, t)  # ("decode", id, 0, 8): the decode began
    for _ in range(12):  # 12 chunks 4.5 s apart: 54 s, past the old 40 s, never hung
        assert batch.hung(300.0, t + 4.5) is None
        t += 4.5
        batch.decoded(8, t)
    assert t - 1000.0 > d.decode_s
    # Then it stops reporting: hung once one chunk's budget (5 s) passes, not after 40 s.
    assert batch.hung(300.0, t + 4.9) is None
    assert batch.hung(300.0, t + 5.1) == "a decode chunk made no progress for 5.0 s"


def _measured_deadlines():
    """A group that measured 50 ms steps and a 4 s decode (8 chunks: 0.5 s each)."""
    model = CostModel(factor=10.0, floor_s=1.0)
    model.observe_step(Cost(64, 64, 4), 0.05)
    model.observe_decode(Cost(64, 64, 4), 4.0)
    return model.deadlines(Cost(64, 64, 4))


def test_health_follows_the_decode_clock_per_chunk():
    group = WorkerGroupExecutor(PipelineSpec(FAKE, parallel=ParallelConfig(ulysses_degree=2)))
    d = _measured_deadlines()
    group._dead.clear()
    group._batch = batch = RunningBatch(0, lambda event: False, d)
    batch.stepped, batch.decoding = True, True
    batch.last_progress -= d.overdue_decode_s + 0.1  # the decode so far, no chunk reported
    assert group.overdue()
    batch.decoded(8, time.monotonic())  # a chunk done: alive again, on a 2 s chunk clock
    assert not group.overdue() and group.describe()["status"] != "step_overdue"
    batch.last_progress -= 2.1
    assert group.overdue() and group.describe()["status"] == "step_overdue"


class _Replay:
    """Rank 0's side of the channel, replaying recorded messages, then closing."""

    def __init__(self, messages):
        self.messages, self.sent = list(messages), []

    def recv(self):
        if not self.messages:
            raise ChannelClosed("replayed")
        return self.messages.pop(0)

    def send(self, message):
        self.sent.append(message)


def test_the_reader_turns_decode_messages_into_the_per_chunk_clock():
    group = WorkerGroupExecutor(PipelineSpec(FAKE, parallel=ParallelConfig(ulysses_degree=2)))
    d = _measured_deadlines()
    steps = []
    group._batch = batch = RunningBatch(7, lambda event: steps.append(event.step), d)
    session = Session(0, "/nonexistent")  # not the group's: the closing channel kills nothing
    session.channel = _Replay(
        [("step", 7, StepEvent(["r"], 4, 4)), ("decode", 7, 0, 8), ("decode", 7, 1, 8)]
    )
    group._reader(session)
    assert steps == [4]  # decode messages never reach the step handler
    assert batch.decoding and batch.decode_chunks == 8
    assert batch.limits(300.0) == d.decode_limits(8) == (pytest.approx(2.0), pytest.approx(5.0))
