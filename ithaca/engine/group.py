"""A torchrun-launched worker group seen from the front process.

Lifecycle: ``start()`` opens a private Unix socket, launches ``torchrun`` (in its own
session so the whole tree can be signalled), accepts rank 0's connection, checks its
token and waits for READY (every rank loaded weights and joined) within
``startup_timeout_s``. A reader thread then receives rank 0's messages; a monitor
thread declares the group dead when

* torchrun exits (it tears the group down as soon as any local rank dies), or
* rank 0's socket closes, or it reports a fatal collective error, or
* the group is idle and no collective ping arrived for ``liveness_timeout_s``
  (a hung or stopped rank blocks the ping's all_reduce), or
* a local rank is stopped (SIGSTOP) or gone (read from ``/proc``, within 0.2 s), or
* a batch runs and its step (or its decode) made no progress within the deadline the
  engine derived from the expected step time (:mod:`ithaca.engine.admission`;
  ``step_timeout_s`` while nothing is measured yet).

One ``start()`` is one generation (:class:`~ithaca.engine.session.Session`): its threads
only act on it, and it is torn down exactly once, so a late teardown never touches the
group that replaced it.

Death fails the running batch with :class:`WorkerGroupDiedError` at once. Shutdown
is bounded: ask rank 0 to stop, then SIGTERM the process group, then SIGKILL.

Multi-node: with ``nnodes > 1`` this launches the node-0 agent of a static
rendezvous (``--nnodes/--node-rank 0/--master-addr/--master-port``); every other
node runs ``ithaca worker-node`` with the same parallel flags and its node rank.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time

from ithaca.engine.admission import Deadlines
from ithaca.engine.errors import GenerationFailedError, WorkerGroupDiedError
from ithaca.engine.executor import (
    ENV_CONFIG,
    ENV_SOCKET,
    ENV_TOKEN,
    PipelineSpec,
    StepHandler,
    spec_to_json,
)
from ithaca.engine.ipc import Channel, ChannelClosed
from ithaca.engine.session import RunningBatch, Session, rank_state
from ithaca.types import GenerationParams, GenerationResult, known_join

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    nproc_per_node: int, nnodes: int, node_rank: int, master_addr: str, master_port: int
) -> list[str]:
    """The torchrun invocation for one node of a static-rendezvous worker group."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        "--max-restarts=0",
        "--monitor-interval=0.2",
        "-m", "ithaca.engine.worker",
    ]  # fmt: skip


class WorkerGroupExecutor:
    """One worker group (``cfg * ring * ulysses`` ranks) behind one socket."""

    def __init__(
        self,
        spec: PipelineSpec,
        name: str = "group-0",
        *,
        startup_timeout_s: float = 600.0,
        heartbeat_interval_s: float = 1.0,
        liveness_timeout_s: float = 10.0,
        step_timeout_s: float = 300.0,
        nnodes: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        env: dict[str, str] | None = None,
    ):
        if spec.parallel.data_parallel_size != 1:
            raise ValueError(
                f"a worker group is one replica; data_parallel_size "
                f"({spec.parallel.data_parallel_size}) "
                "must be 1 here (the engine runs one group per replica)"
            )
        world = spec.parallel.world_size
        if world % nnodes:
            raise ValueError(f"world size ({world}) must be a multiple of nnodes ({nnodes})")
        self.spec = spec
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness_timeout_s = liveness_timeout_s
        self.step_timeout_s = step_timeout_s
        self.nnodes = nnodes
        self.master_addr = master_addr
        self.master_port = master_port
        self.extra_env = dict(env or {})
        self._session: Session | None = None
        self._generations = itertools.count(1)
        self._dead = threading.Event()
        self._dead.set()  # not started
        self.death_reason = "not started"
        self._last_alive = 0.0
        self._batch: RunningBatch | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._exec_lock = threading.Lock()
        self._validations: dict[int, tuple[threading.Event, list]] = {}

    @property
    def ranks(self) -> list[dict]:
        session = self._session
        return session.ranks if session is not None else []

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        tmpdir = tempfile.mkdtemp(prefix="ithaca-")
        os.chmod(tmpdir, 0o700)
        session = Session(next(self._generations), tmpdir)
        path = os.path.join(tmpdir, "front.sock")
        token = secrets.token_hex(16)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        port = self.master_port or free_port()
        env = {
            **os.environ,
            **self.extra_env,
            ENV_CONFIG: spec_to_json(self.spec, self.heartbeat_interval_s),
            ENV_SOCKET: path,
            ENV_TOKEN: token,
        }
        cmd = torchrun_command(
            self.spec.parallel.world_size // self.nnodes, self.nnodes, 0, self.master_addr, port
        )
        log.info("%s: launching %s", self.name, " ".join(cmd))
        session.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            session.channel = self._accept(session, listener, token, deadline)
            session.ranks = self._await_ready(session, deadline)
        except BaseException:
            self._session = session  # dead (``_dead`` stays set); kept for inspection
            session.teardown()
            raise
        finally:
            listener.close()
        with self._lock:
            self._session = session
            self.death_reason = ""
            self._last_alive = time.monotonic()
            self._dead.clear()
        for target, kind in ((self._reader, "reader"), (self._monitor, "monitor")):
            threading.Thread(
                target=target, args=(session,), name=f"{self.name}-{kind}", daemon=True
            ).start()
        log.info("%s: READY, ranks %s", self.name, session.ranks)

    def _accept(self, session, listener: socket.socket, token: str, deadline: float) -> Channel:
        while True:
            self._check_running(session, "before connecting")
            listener.settimeout(min(1.0, max(0.01, deadline - time.monotonic())))
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise WorkerGroupDiedError(
                        f"{self.name}: rank 0 did not connect within {self.startup_timeout_s:.0f} s"
                    ) from None
                continue
            conn.settimeout(None)
            channel = Channel(conn)
            kind, given, _pid = channel.recv()
            if kind == "hello" and hmac.compare_digest(str(given), token):
                return channel
            channel.close()  # not ours

    def _await_ready(self, session: Session, deadline: float) -> list[dict]:
        assert session.channel is not None
        channel = session.channel
        result: dict = {}

        def read() -> None:
            try:
                result["msg"] = channel.recv()
            except ChannelClosed as exc:
                result["msg"] = ("failed", f"rank 0 closed the connection: {exc}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(timeout=0.5)
            if reader.is_alive():
                self._check_running(session, "while loading")
                if time.monotonic() > deadline:
                    raise WorkerGroupDiedError(
                        f"{self.name}: not every rank was READY within "
                        f"{self.startup_timeout_s:.0f} s"
                    )
        msg = result["msg"]
        if msg[0] != "ready":
            raise WorkerGroupDiedError(f"{self.name}: startup failed: {msg[1]}")
        return msg[1]

    def _check_running(self, session: Session, when: str) -> None:
        assert session.proc is not None
        code = session.proc.poll()
        if code is not None:
            raise WorkerGroupDiedError(f"{self.name}: torchrun exited with code {code} {when}")

    def pids(self) -> list[int]:
        return [r["pid"] for r in self.ranks]

    def is_alive(self) -> bool:
        return not self._dead.is_set()

    def overdue(self) -> bool:
        """A batch runs and its current step (or decode) is late: slow, maybe hung."""
        batch = self._batch
        if batch is None or self._dead.is_set():
            return False
        late_after, _ = batch.limits(self.step_timeout_s)
        return time.monotonic() - batch.last_progress > late_after

    def describe(self) -> dict:
        """For ``/health``: no reasons, paths or addresses (those go to the log)."""
        status = "ok" if self.is_alive() else "down"
        if self.overdue():
            status = "step_overdue"
        return {
            "name": self.name,
            "alive": self.is_alive(),
            "status": status,
            "ranks": [
                {"rank": r["rank"], "pid": r["pid"], **r.get("memory", {})} for r in self.ranks
            ],
        }

    def _die(self, session: Session, reason: str) -> None:
        with self._lock:
            if self._session is not session or self._dead.is_set():
                return  # a previous generation's thread, or already dead
            self.death_reason = reason
            self._dead.set()
            batch = self._batch
        log.error("%s: worker group is dead: %s", self.name, reason)
        if batch is not None:
            batch.error = WorkerGroupDiedError(f"worker group {self.name} died: {reason}")
            batch.done.set()
        self._fail_validations()
        session.teardown()

    def shutdown(self, timeout: float = 10.0) -> None:
        session = self._session
        if session is None:
            return
        if session.channel is not None and not self._dead.is_set():
            with contextlib.suppress(ChannelClosed):
                running = self._batch
                if running is not None:  # stop it at the next step, then leave the loop
                    session.channel.send(("cancel", running.batch_id))
                session.channel.send(("shutdown",))
        with self._lock:
            self.death_reason = self.death_reason or "shut down"
            self._dead.set()
            batch = self._batch
        if batch is not None:  # a batch still running when the drain ran out
            batch.error = WorkerGroupDiedError(f"worker group {self.name} was shut down")
            batch.done.set()
        self._fail_validations()
        session.stop(timeout)

    # -- background threads ----------------------------------------------------------

    def _reader(self, session: Session) -> None:
        channel = session.channel
        assert channel is not None
        while not session.torn_down:
            try:
                msg = channel.recv()
            except ChannelClosed as exc:
                self._die(session, f"rank 0 connection lost ({exc})")
                return
            kind = msg[0]
            if kind == "alive":
                self._last_alive = time.monotonic()
                continue
            if kind == "fatal":
                self._die(session, msg[1])
                return
            if kind == "validated":
                waiter = self._validations.get(msg[1])
                if waiter is not None:
                    waiter[1].append(msg[2:])
                    waiter[0].set()
                continue
            batch = self._batch
            if batch is None or msg[1] != batch.batch_id:
                log.warning("%s: message %r for an unknown batch", self.name, kind)
                if kind == "admit":  # rank 0 waits for an answer: none join
                    channel.send(("joiners", msg[1], []))
                continue
            batch.last_progress = time.monotonic()
            if kind == "admit":  # ("admit", id, join_key): a step boundary of a step batch
                channel.send(("joiners", batch.batch_id, self._joiners(batch, msg[2])))
            elif kind == "done":  # ("done", id, result): a request left the step batch
                if batch.on_done is not None:
                    batch.on_done(msg[2])
            elif kind == "decode":  # ("decode", id, chunk, chunks): chunk of chunks done
                batch.decoded(msg[3], batch.last_progress)
            elif kind == "step":
                event = msg[2]
                batch.stepped = True
                batch.decoding = event.step >= event.total_steps
                cancel = batch.on_step(event)
                if cancel and not batch.cancel_sent:
                    batch.cancel_sent = True
                    channel.send(("cancel", batch.batch_id))
            elif kind == "result":
                batch.results = msg[2]
                batch.stats = msg[3] if len(msg) > 3 else {}
                for rank, memory in zip(session.ranks, batch.stats.get("ranks", ()), strict=False):
                    rank["memory"] = memory  # every rank's, sent with the result
                batch.done.set()
            elif kind == "error":
                batch.error = GenerationFailedError(msg[3], msg[2], msg[4])
                batch.done.set()

    def _stopped_rank(self, session: Session) -> str | None:
        """A local rank that is stopped (SIGSTOP) or gone, found from /proc at once."""
        host = socket.gethostname()
        for r in session.ranks:
            if r.get("host") != host:
                continue  # other nodes: the collective deadlines find them
            state = rank_state(r["pid"])
            if state is None or state in "ZXx":
                return f"rank {r['rank']} (pid {r['pid']}) exited"
            if state in "Tt":
                return f"rank {r['rank']} (pid {r['pid']}) is stopped"
        return None

    def _monitor(self, session: Session) -> None:
        proc = session.proc
        assert proc is not None
        while not session.torn_down and not self._dead.wait(0.2):
            code = proc.poll()
            if code is not None:
                self._die(session, f"torchrun exited with code {code} (a rank died)")
                return
            stopped = self._stopped_rank(session)
            if stopped is not None:
                self._die(session, stopped)
                return
            now = time.monotonic()
            batch = self._batch
            if batch is not None:
                hung = batch.hung(self.step_timeout_s, now)
                if hung is not None:
                    self._die(session, hung)
                    return
            elif now - self._last_alive > self.liveness_timeout_s:
                self._die(
                    session, f"no liveness ping for {self.liveness_timeout_s:.0f} s (a rank hangs)"
                )
                return

    # -- requests ----------------------------------------------------------------------

    def _fail_validations(self) -> None:
        for event, box in list(self._validations.values()):
            box.append((False, "internal", "the worker group is down"))
            event.set()

    def validate(self, params: GenerationParams, timeout: float = 30.0) -> dict:
        """The pipeline's per-request check on rank 0, outside the lockstep loop.

        Returns the resolved shape (width, height, steps, frames, do_cfg) for admission;
        raises :class:`GenerationFailedError` (``invalid_request``) for the client's mistake.
        """
        session = self._session
        if session is None or self._dead.is_set() or session.channel is None:
            raise WorkerGroupDiedError(f"worker group {self.name} is down")
        vid = next(self._ids)
        event, box = threading.Event(), []
        self._validations[vid] = (event, box)
        try:
            try:
                session.channel.send(("validate", vid, params))
            except ChannelClosed as exc:
                raise WorkerGroupDiedError(f"worker group {self.name} is down") from exc
            if not event.wait(timeout):
                raise WorkerGroupDiedError(f"{self.name}: rank 0 did not answer a validation")
        finally:
            self._validations.pop(vid, None)
        ok, kind, payload, param = box[0]
        if ok:
            return payload
        if kind == "invalid_request":
            raise GenerationFailedError(payload, kind, param)
        raise WorkerGroupDiedError(f"{self.name}: validation failed: {payload}")

    def execute(
        self,
        batch: list[GenerationParams],
        on_step: StepHandler,
        deadlines: Deadlines | None = None,
    ) -> list[GenerationResult]:
        return self._roundtrip("batch", batch, on_step, deadlines)

    def execute_stepwise(self, batch, on_step: StepHandler, admit, on_done):
        """``execute`` with step-level batching on the group: at each step boundary rank 0
        asks for joiners and ``admit(accepts)`` hands over the waiting requests whose
        validated ``join_key`` is the batch's; ``on_done(result)`` gets each request as
        it leaves. Returns the results not given to ``on_done`` (cancelled ones)."""
        return self._roundtrip("stepwise", batch, on_step, admit=admit, on_done=on_done)

    def nudge(self) -> None:
        """A request was queued: a running step batch asks for joiners at its next
        boundary (rank 0 asks only when nudged or when a member left, so a boundary with
        nobody waiting costs no round trip to the front)."""
        batch, session = self._batch, self._session
        if batch is None or batch.admit is None or session is None or session.channel is None:
            return
        with contextlib.suppress(ChannelClosed):  # a dead group is the monitor's business
            session.channel.send(("waiting", batch.batch_id))

    def _joiners(self, batch: RunningBatch, key) -> list[GenerationParams]:
        """The reader thread, at rank 0's step boundary: the engine's joiners for ``key``."""
        if batch.admit is None or key is None:
            return []
        key = tuple(key)

        def accepts(params: GenerationParams, resolved: dict | None = None) -> bool:
            return bool(known_join(key, resolved))  # no model here: unvalidated waits

        try:
            return list(batch.admit(accepts))
        except Exception:  # an engine bug must not leave rank 0 waiting for its answer
            log.exception("%s: admitting joiners failed", self.name)
            return []

    def manage_lora(self, command) -> list[dict]:
        """Run a :class:`ithaca.types.LoraCommand` on every rank, between batches."""
        return self._roundtrip("lora", command, lambda event: False)

    def _roundtrip(
        self, kind: str, payload, on_step: StepHandler, deadlines=None, admit=None, on_done=None
    ):
        with self._exec_lock:
            running = RunningBatch(next(self._ids), on_step, deadlines)
            running.admit, running.on_done = admit, on_done
            with self._lock:
                if self._dead.is_set():
                    raise WorkerGroupDiedError(
                        f"worker group {self.name} is down: {self.death_reason}"
                    )
                self._batch = running
                session = self._session
            try:
                assert session is not None and session.channel is not None
                session.channel.send((kind, running.batch_id, payload))
            except ChannelClosed as exc:
                self._die(session, f"rank 0 connection lost ({exc})")
            running.done.wait()
            with self._lock:
                self._batch = None
                # An idle group must ping again within liveness_timeout_s from now.
                self._last_alive = time.monotonic()
            if running.error is not None:
                raise running.error
            assert running.results is not None
            if kind == "batch":  # a management command measures nothing
                self.last_stats = running.stats
            return running.results
