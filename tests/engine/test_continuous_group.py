"""Continuous (step-level) batching on a real torchrun worker group (Ulysses 2, gloo) with
the tiny Qwen-Image checkpoint, 32x32: rank 0 asks the front for joiners at each step
boundary and broadcasts the decision to rank 1.

- a request that starts the step batch equals its fused result on the same group, bit
  for bit; one joining after step 1 is within 1/255 of its solo run on the group;
- a request that finished is delivered (``on_done``) while the batch still runs; rank 0
  asks the front for joiners only at the first boundary, after a member left or after
  the front said a request waits (``nudge``), not at every boundary;
- through the engine: a request submitted mid-run joins and is answered first;
- a request with a step cache joins a batch with its cache settings (per-request cache
  state) and ends within 1/255 of its solo cached run, with the same skip counts;
- cancelled requests stop at the next boundary; a killed rank fails the batch at once.
"""

import os
import signal
import threading
import time

import numpy as np
import pytest

from ithaca.config import ParallelConfig
from ithaca.engine.engine import Engine
from ithaca.engine.errors import WorkerGroupDiedError
from ithaca.engine.executor import PipelineSpec
from ithaca.engine.group import WorkerGroupExecutor
from ithaca.types import GenerationParams
from tests.server.harness import REPO

# A request joining mid-run depends on when it arrives: alone, not beside an xdist worker.
pytestmark = pytest.mark.serial


def P(rid: str, steps: int, seed: int, size: int = 32, **kw) -> GenerationParams:
    return GenerationParams("a red cat", negative_prompt="blurry", width=size, height=size,
                            num_inference_steps=steps, seed=seed, request_id=rid, **kw)  # fmt: skip


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=int)


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    from ithaca.testing.tiny import build_tiny_qwen_image

    path = tiny_checkpoint(build_tiny_qwen_image, "t2i")  # tiny_checkpoints' t2i, alone
    spec = PipelineSpec(path, parallel=ParallelConfig(ulysses_degree=2))
    group = WorkerGroupExecutor(spec, env={"PYTHONPATH": REPO})
    engine = Engine([group], max_batch_size=4, batch_wait_ms=0, continuous=True,
                    on_worker_failure="exit")  # the last test kills a rank: no restart  # fmt: skip
    engine.start(timeout=300)
    yield engine, group
    engine.shutdown()


def never(event) -> bool:
    return False


def test_joins_and_leaves_at_step_boundaries_on_the_group(served):
    _, group = served
    a, b, c = P("a", 2, seed=1), P("b", 2, seed=2), P("c", 3, seed=3, true_cfg_scale=2.5)
    keys = {p.request_id: group.validate(p) for p in (a, b, c)}
    assert keys["a"]["join_key"] == keys["c"]["join_key"] is not None  # steps, scale differ
    other = P("o", 2, seed=4, size=64)
    other_key = group.validate(other)
    cached = P("t", 2, seed=5, cache_backend="tea_cache")  # other cache settings
    cached_key = group.validate(cached)
    assert cached_key["join_key"] not in (None, keys["a"]["join_key"])
    fused = {r.request_id: r for r in group.execute([a, b], never)}
    solo = group.execute([c], never)[0]

    events, boundaries, asked = [], [], []

    def on_step(event) -> bool:
        events.append(("step", tuple(event.request_ids), event.step))
        return False

    def admit(accepts):
        boundaries.append(len(boundaries) + 1)
        if len(boundaries) == 1:  # after step 1 of a and b
            asked.append((accepts(c, keys["c"]), accepts(other, other_key), accepts(c, {}),
                          accepts(cached, cached_key)))  # fmt: skip
            return [c]
        return []

    def on_done(result):
        events.append(("done", result.request_id))
        done[result.request_id] = result

    done: dict = {}
    rest = group.execute_stepwise([a, b], on_step, admit, on_done)
    assert rest == []  # every result was delivered as its request left
    # An unknown join key (not validated) or other cache settings: it waits for its own.
    assert asked == [(True, False, False, False)]
    # Rank 0 asks at the first boundary and where members left (a, b after 2 steps; c
    # after 1 + 3), not at batch step 3: nobody was queued (no nudge) and nobody left.
    assert boundaries == [1, 2, 3]
    # a and b were delivered before c's last step ran (not at the end of the batch).
    assert events.index(("done", "a")) < events.index(("step", ("c",), 3))
    assert done["c"].metadata["batching"]["joined_at_batch_step"] == 1
    for rid in "ab":
        assert done[rid].metadata["batching"]["joined_at_batch_step"] == 0
        assert np.array_equal(pixels(done[rid]), pixels(fused[rid])), rid
    assert np.abs(pixels(done["c"]) - pixels(solo)).max() <= 1


def test_a_cached_request_joins_with_its_own_cache_state_on_the_group(served):
    _, group = served
    cache = dict(cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.6})
    head, joiner = P("ch", 5, seed=1, **cache), P("cj", 4, seed=2, **cache)
    key = group.validate(joiner)
    assert key["join_key"] == group.validate(head)["join_key"] is not None
    solo = group.execute([joiner], never)[0]
    boundaries: list = []

    def admit(accepts):
        boundaries.append(1)
        if len(boundaries) == 1:  # as the engine does when a request is queued
            group.nudge()  # reaches rank 0 before this answer: it asks at the next boundary
        return [joiner] if len(boundaries) == 2 and accepts(joiner, key) else []

    done: dict = {}
    group.execute_stepwise([head], never, admit, lambda r: done.setdefault(r.request_id, r))
    assert done["cj"].metadata["batching"]["joined_at_batch_step"] == 2
    assert done["cj"].metadata["cache"] == solo.metadata["cache"]
    assert solo.metadata["cache"]["cached_steps"] > 0
    assert np.abs(pixels(done["cj"]) - pixels(solo)).max() <= 1


def test_the_engine_joins_a_request_submitted_mid_run(served):
    engine, _ = served
    order, late, threads = [], [], []

    def submit(params, **kw):
        return engine.submit(params, resolved=engine.validate(params), **kw)

    def join_late():  # not on the front's reader thread: validate() waits for it
        late.append(submit(P("short", 2, seed=9)))
        late[0].future.add_done_callback(lambda f: order.append("short"))

    def on_progress(step, total, previews):
        if step == 1 and not threads:
            threads.append(threading.Thread(target=join_late))
            threads[0].start()

    long = submit(P("long", 8, seed=1), on_progress=on_progress)
    long.future.add_done_callback(lambda f: order.append("long"))
    result = long.future.result(timeout=120)
    threads[0].join(timeout=30)
    short = late[0].future.result(timeout=120)
    assert order == ["short", "long"] and late[0].started < long.finished
    assert short.metadata["batching"]["joined_at_batch_step"] >= 1
    assert result.metadata["batching"]["joined_at_batch_step"] == 0


def test_cancel_stops_at_a_boundary_and_a_killed_rank_fails_at_once(served):
    engine, group = served
    req = engine.submit(P("cancel", 200, seed=5))
    while req.step < 2:
        time.sleep(0.05)
    engine.cancel(req)
    with pytest.raises(Exception, match="cancelled"):
        req.future.result(timeout=30)

    steps = []

    def on_step(event) -> bool:
        steps.append(event.step)
        if len(steps) == 2:
            os.kill(group.pids()[1], signal.SIGKILL)
        return False

    started = time.monotonic()
    with pytest.raises(WorkerGroupDiedError):
        group.execute_stepwise([P("k", 200, seed=6)], on_step, lambda accepts: [], None)
    assert time.monotonic() - started < 30 and len(steps) < 200
