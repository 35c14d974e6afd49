"""What the front keeps per worker-group generation and per running batch.

:class:`Session` is everything one ``WorkerGroupExecutor.start()`` created (socket
directory, torchrun, channel, ranks), torn down exactly once; :class:`RunningBatch` is
one batch in flight with its progress clock and deadlines; :func:`rank_state` reads a
local rank's kernel state so a stopped or vanished rank is found without waiting for a
collective to time out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

from ithaca.engine.admission import Deadlines
from ithaca.engine.executor import StepHandler
from ithaca.engine.ipc import Channel
from ithaca.types import GenerationResult


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ithaca.engine.worker" in f.read()
    except OSError:
        return False


def rank_state(pid: int) -> str | None:
    """The kernel's state letter of a local process (``R``, ``S``, ``T`` stopped, ``Z``
    zombie), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) S ...": comm may hold spaces or parentheses, the state follows the last ')'.
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3].decode()


class RunningBatch:
    def __init__(self, batch_id: int, on_step: StepHandler, deadlines: Deadlines | None):
        self.batch_id = batch_id
        self.on_step = on_step
        self.deadlines = deadlines
        self.done = threading.Event()
        self.results: list[GenerationResult] | None = None
        self.stats: dict = {}
        self.error: Exception | None = None
        self.cancel_sent = False
        self.stepped = False
        self.decoding = False
        self.decode_chunks = 0  # known from the decode's first progress message
        self.last_progress = time.monotonic()
        self.admit = None
        """Continuous batching: the engine's ``admit(accepts)`` (joiners at a boundary)."""
        self.on_done = None
        """Continuous batching: the engine's ``on_done(result)`` (a request that left)."""

    def limits(self, fallback_s: float) -> tuple[float, float]:
        """(overdue, hung) seconds without progress for the phase the batch is in.

        Before its first step event a batch also encodes prompts and input images (not
        in the cost model): that phase keeps the fixed ``fallback_s`` (a stopped rank is
        still found at once from ``/proc``)."""
        d = self.deadlines
        if d is None or not self.stepped:
            return fallback_s, fallback_s
        if self.decoding:
            return d.decode_limits(self.decode_chunks)
        return d.overdue_step_s, d.step_s

    def decoded(self, chunks: int, now: float) -> None:
        """A chunk of the final decode of ``chunks`` finished (or the decode began): the
        clock restarts, with one chunk's budget (:meth:`Deadlines.decode_limits`)."""
        self.decoding, self.decode_chunks, self.last_progress = True, chunks, now

    def hung(self, fallback_s: float, now: float) -> str | None:
        """Why the batch counts as hung at ``now`` (no progress within its phase's
        limit), or None."""
        _, hung_after = self.limits(fallback_s)
        if now - self.last_progress <= hung_after:
            return None
        phase = "a decode chunk" if self.decode_chunks else "the decode"
        phase = phase if self.decoding else "a denoising step"
        return f"{phase} made no progress for {hung_after:.1f} s"


class Session:
    """What one ``start()`` created; torn down exactly once, whoever asks first."""

    def __init__(self, generation: int, tmpdir: str):
        self.generation = generation
        self.tmpdir = tmpdir
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.ranks: list[dict] = []
        self._once = threading.Lock()
        self.torn_down = False

    def stop(self, timeout: float, grace: float = 1.0) -> None:
        """After the ranks were told to shut down: wait (up to ``timeout`` s) until this
        node's ranks have exited, give torchrun ``grace`` s to follow, then tear down.

        Once its workers are done, torchrun's own exit is seconds of interpreter teardown
        (7 s on a busy 2-core host; SIGTERM does not shorten it) that holds nothing of
        ours, so what is left of it then is killed instead of waited for."""
        deadline = time.monotonic() + timeout
        host = socket.gethostname()
        local = [r["pid"] for r in self.ranks if r.get("host") == host]
        while any(_is_worker(pid) for pid in local) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Ranks still loading are not known yet: then torchrun stops them (teardown).
        done = bool(local) and not any(_is_worker(pid) for pid in local)
        proc = self.proc
        if proc is not None:
            left = max(0.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(grace, left) if done else left)
            if done and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5.0)
        self.teardown()

    def teardown(self) -> None:
        """Bounded: SIGKILL our local ranks, SIGTERM torchrun (5 s), SIGKILL it; close up.

        torchrun starts each rank in its own session, and a stopped (hung) rank ignores
        the agent's SIGTERM, so ranks are killed by pid (checked to still be ours).
        Ranks on other nodes die with the rendezvous when their peers vanish. A second
        caller waits for the first to finish and then does nothing (so a late teardown
        can never remove the socket directory of the group that replaced this one).
        """
        with self._once:
            if self.torn_down:
                return
            self.torn_down = True
            host = socket.gethostname()
            for r in self.ranks:
                if r.get("host") == host and _is_worker(r["pid"]):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(r["pid"], signal.SIGKILL)
            proc = self.proc
            if proc is not None and proc.poll() is None:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=5.0)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            if self.channel is not None:
                self.channel.close()
            shutil.rmtree(self.tmpdir, ignore_errors=True)
