"""A real torchrun worker group (--usp 2, gloo) behind the engine: READY handshake,
results equal to the in-process twin, hang detection (a stopped rank, idle or mid-step; a
slow decode that reports its chunks is not one),
restart with one teardown per generation, bounded shutdown that leaves no rank behind,
startup failure with the rank's error."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from ithaca.config import ParallelConfig
from ithaca.engine.admission import Deadlines
from ithaca.engine.engine import Engine
from ithaca.engine.errors import EngineDeadError, WorkerGroupDiedError
from ithaca.engine.executor import InProcessExecutor, PipelineSpec
from ithaca.engine.group import WorkerGroupExecutor
from ithaca.types import GenerationParams
from tests.engine.doubles import DECODE_CHUNKS, SLOW_DECODE_CHUNK_S
from tests.server.harness import FAKE, REPO

USP2 = ParallelConfig(ulysses_degree=2)


def P(seed=0, steps=3, prompt="a cat"):
    return GenerationParams(prompt, width=32, height=32, num_inference_steps=steps, seed=seed)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout: float) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError
        time.sleep(0.05)
    return time.monotonic() - start


def test_group_serves_detects_a_hang_and_restarts():
    group = WorkerGroupExecutor(
        PipelineSpec(FAKE, parallel=USP2),
        liveness_timeout_s=3.0,
        heartbeat_interval_s=0.5,
        env={"PYTHONPATH": REPO, "ITHACA_FAKE_STEP_S": "0.1"},
    )
    twin = InProcessExecutor(PipelineSpec(FAKE))
    engine = Engine([group], max_batch_size=1)
    engine.start(timeout=120)
    twin.start()
    try:
        ranks = group.describe()["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
        out = engine.generate(P(seed=7), timeout=30)
        ref = twin.execute([P(seed=7)], lambda e: False)[0]
        assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))

        # A decode of 4 chunks x 0.25 s (1 s) outlives a whole-decode limit of 0.6 s but
        # reports each chunk (0.2 s expected, hung after 2 s without one): alive.
        slow = Deadlines(30.0, 0.6, 30.0, 0.6, expected_decode_s=0.8, factor=10.0, floor_s=0.0)
        started = time.monotonic()
        [res] = group.execute([P(seed=5, prompt="slow-decode")], lambda e: False, slow)
        assert time.monotonic() - started > DECODE_CHUNKS * SLOW_DECODE_CHUNK_S > slow.decode_s
        assert res.images and group.is_alive()

        # SIGKILL of a rank under load (503 within 10 s, restart) is proven end to end
        # through HTTP in tests/server/test_openai_sdk.py; here: a hang.
        # SIGSTOP rank 1 while idle: the collective ping stalls, the group is declared hung.
        old = group.pids()
        os.kill(old[1], signal.SIGSTOP)
        detected = wait_for(lambda: not engine.alive, 10)
        assert detected < 3.0 + 2.0
        wait_for(lambda: engine.alive, 60)
        assert not any(alive(p) for p in old)  # the stopped rank was killed, not leaked
        assert engine.generate(P(seed=3), timeout=30).images
        assert engine.metrics.restarts._value.get() == 1

        # A decode that stops reporting is hung one chunk's budget (2 s) after its last
        # message, not after its whole-decode limit (30 s); 3 steps of 0.1 s before it.
        stall = Deadlines(30.0, 30.0, 30.0, 30.0, expected_decode_s=0.8, factor=10.0, floor_s=0)
        started = time.monotonic()
        with pytest.raises(WorkerGroupDiedError, match=r"decode chunk made no progress for 2\.0 s"):
            group.execute([P(seed=6, prompt="stall-decode")], lambda e: False, stall)
        assert 2.0 < time.monotonic() - started < 3 * 0.1 + 2 * 2.0
    finally:
        pids = group.pids()
        engine.shutdown()
    assert group._session.proc.poll() is not None  # torchrun reaped: nothing outlives it
    wait_for(lambda: not any(alive(p) for p in pids), 10)


def test_a_rank_that_fails_to_load_fails_startup_with_its_error():
    group = WorkerGroupExecutor(
        PipelineSpec("tests.engine.doubles:crash_on_load", parallel=USP2),
        env={"PYTHONPATH": REPO},
    )
    engine = Engine([group])
    with pytest.raises(EngineDeadError, match="weights are corrupt"):
        engine.start(timeout=120)
    engine.shutdown()
    assert group._session.proc.poll() is not None


def test_one_teardown_per_generation_and_a_stopped_rank_mid_step_fails_at_once():
    group = WorkerGroupExecutor(
        PipelineSpec(FAKE, parallel=USP2),
        env={"PYTHONPATH": REPO, "ITHACA_FAKE_STEP_S": "0.2"},
    )
    group.start()
    first = group._session
    # The engine's restart path: the monitor's _die and the engine's shutdown race.
    racer = threading.Thread(target=group._die, args=(first, "test: rank died"))
    racer.start()
    group.shutdown(timeout=1.0)
    racer.join()
    assert first.torn_down and not os.path.exists(first.tmpdir)
    engine = Engine([group], max_batch_size=1)
    engine.start(timeout=120)  # the restart
    try:
        second = group._session
        assert second is not first and os.path.isdir(second.tmpdir)
        first.teardown()  # late teardown and death reports of the old generation:
        group._die(first, "test: a late report")  # they must not touch the new one
        assert group.is_alive() and os.path.isdir(second.tmpdir)
        assert engine.generate(P(seed=1), timeout=30).images

        req = engine.submit(P(seed=2, steps=200))  # 40 s if it ran to the end
        wait_for(lambda: req.step >= 3, 30)
        os.kill(group.pids()[1], signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            req.future.result(timeout=30)
        assert time.monotonic() - t0 < 2.0  # found from /proc, not after a step timeout
        assert "503" not in str(req.future.exception())
        health = group.describe()
        assert "reason" not in health and health["status"] in ("down", "ok")
    finally:
        pids = group.pids()
        engine.shutdown()
    wait_for(lambda: not any(alive(p) for p in pids), 10)
