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
* a batch runs and no denoising step finished for ``step_timeout_s``.

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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from ithaca.engine.errors import GenerationFailedError, WorkerGroupDiedError
from ithaca.engine.executor import PipelineSpec, StepHandler
from ithaca.engine.ipc import Channel, ChannelClosed
from ithaca.engine.worker import ENV_CONFIG, ENV_SOCKET, ENV_TOKEN, spec_to_json
from ithaca.types import GenerationParams, GenerationResult

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


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ithaca.engine.worker" in f.read()
    except OSError:
        return False


class _Batch:
    def __init__(self, batch_id: int, on_step: StepHandler):
        self.batch_id = batch_id
        self.on_step = on_step
        self.done = threading.Event()
        self.results: list[GenerationResult] | None = None
        self.error: Exception | None = None
        self.cancel_sent = False
        self.last_progress = time.monotonic()


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
        self.ranks: list[dict] = []
        self._proc: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._tmpdir: str | None = None
        self._dead = threading.Event()
        self._dead.set()  # not started
        self.death_reason = "not started"
        self._last_alive = 0.0
        self._batch: _Batch | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._exec_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="ithaca-")
        os.chmod(self._tmpdir, 0o700)
        path = os.path.join(self._tmpdir, "front.sock")
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
        self._proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            self._channel = self._accept(listener, token, deadline)
            self.ranks = self._await_ready(deadline)
        except BaseException:
            self._kill()
            raise
        finally:
            listener.close()
        self.death_reason = ""
        self._last_alive = time.monotonic()
        self._dead.clear()
        threading.Thread(target=self._reader, name=f"{self.name}-reader", daemon=True).start()
        threading.Thread(target=self._monitor, name=f"{self.name}-monitor", daemon=True).start()
        log.info("%s: READY, ranks %s", self.name, self.ranks)

    def _accept(self, listener: socket.socket, token: str, deadline: float) -> Channel:
        while True:
            self._check_running("before connecting")
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

    def _await_ready(self, deadline: float) -> list[dict]:
        assert self._channel is not None
        result: dict = {}

        def read() -> None:
            try:
                result["msg"] = self._channel.recv()
            except ChannelClosed as exc:
                result["msg"] = ("failed", f"rank 0 closed the connection: {exc}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while reader.is_alive():
            reader.join(timeout=0.5)
            if reader.is_alive():
                self._check_running("while loading")
                if time.monotonic() > deadline:
                    raise WorkerGroupDiedError(
                        f"{self.name}: not every rank was READY within "
                        f"{self.startup_timeout_s:.0f} s"
                    )
        msg = result["msg"]
        if msg[0] != "ready":
            raise WorkerGroupDiedError(f"{self.name}: startup failed: {msg[1]}")
        return msg[1]

    def _check_running(self, when: str) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise WorkerGroupDiedError(f"{self.name}: torchrun exited with code {code} {when}")

    def pids(self) -> list[int]:
        return [r["pid"] for r in self.ranks]

    def is_alive(self) -> bool:
        return not self._dead.is_set()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "alive": self.is_alive(),
            "reason": self.death_reason or None,
            "ranks": self.ranks,
        }

    def _die(self, reason: str) -> None:
        with self._lock:
            if self._dead.is_set():
                return
            self.death_reason = reason
            self._dead.set()
            batch = self._batch
        log.error("%s: worker group is dead: %s", self.name, reason)
        if batch is not None:
            batch.error = WorkerGroupDiedError(f"worker group {self.name} died: {reason}")
            batch.done.set()
        self._kill()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._channel is not None and not self._dead.is_set():
            with contextlib.suppress(ChannelClosed):
                running = self._batch
                if running is not None:  # stop it at the next step, then leave the loop
                    self._channel.send(("cancel", running.batch_id))
                self._channel.send(("shutdown",))
        with self._lock:
            self.death_reason = self.death_reason or "shut down"
            self._dead.set()
            batch = self._batch
        if batch is not None:  # a batch still running when the drain ran out
            batch.error = WorkerGroupDiedError(f"worker group {self.name} was shut down")
            batch.done.set()
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=timeout)
        self._kill()

    def _kill(self) -> None:
        """Bounded: SIGKILL our local ranks, SIGTERM torchrun (5 s), SIGKILL it; close up.

        torchrun starts each rank in its own session, and a stopped (hung) rank ignores
        the agent's SIGTERM, so ranks are killed by pid (checked to still be ours).
        Ranks on other nodes die with the rendezvous when their peers vanish.
        """
        host = socket.gethostname()
        for r in self.ranks:
            if r.get("host") == host and _is_worker(r["pid"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r["pid"], signal.SIGKILL)
        proc = self._proc
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
        if self._channel is not None:
            self._channel.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- background threads ----------------------------------------------------------

    def _reader(self) -> None:
        channel = self._channel
        assert channel is not None
        while not self._dead.is_set():
            try:
                msg = channel.recv()
            except ChannelClosed as exc:
                self._die(f"rank 0 connection lost ({exc})")
                return
            kind = msg[0]
            if kind == "alive":
                self._last_alive = time.monotonic()
                continue
            if kind == "fatal":
                self._die(msg[1])
                return
            batch = self._batch
            if batch is None or msg[1] != batch.batch_id:
                log.warning("%s: message %r for an unknown batch", self.name, kind)
                continue
            batch.last_progress = time.monotonic()
            if kind == "step":
                cancel = batch.on_step(msg[2])
                if cancel and not batch.cancel_sent:
                    batch.cancel_sent = True
                    channel.send(("cancel", batch.batch_id))
            elif kind == "result":
                batch.results = msg[2]
                batch.done.set()
            elif kind == "error":
                batch.error = GenerationFailedError(msg[3], msg[2])
                batch.done.set()

    def _monitor(self) -> None:
        proc = self._proc
        assert proc is not None
        while not self._dead.wait(0.2):
            code = proc.poll()
            if code is not None:
                self._die(f"torchrun exited with code {code} (a rank died)")
                return
            now = time.monotonic()
            batch = self._batch
            if batch is not None:
                if now - batch.last_progress > self.step_timeout_s:
                    self._die(f"no denoising step finished within {self.step_timeout_s:.0f} s")
                    return
            elif now - self._last_alive > self.liveness_timeout_s:
                self._die(f"no liveness ping for {self.liveness_timeout_s:.0f} s (a rank hangs)")
                return

    # -- requests ----------------------------------------------------------------------

    def execute(
        self, batch: list[GenerationParams], on_step: StepHandler
    ) -> list[GenerationResult]:
        return self._roundtrip("batch", batch, on_step)

    def manage_lora(self, command) -> list[dict]:
        """Run a :class:`ithaca.types.LoraCommand` on every rank, between batches."""
        return self._roundtrip("lora", command, lambda event: False)

    def _roundtrip(self, kind: str, payload, on_step: StepHandler):
        with self._exec_lock:
            running = _Batch(next(self._ids), on_step)
            with self._lock:
                if self._dead.is_set():
                    raise WorkerGroupDiedError(
                        f"worker group {self.name} is down: {self.death_reason}"
                    )
                self._batch = running
            try:
                assert self._channel is not None
                self._channel.send((kind, running.batch_id, payload))
            except ChannelClosed as exc:
                self._die(f"rank 0 connection lost ({exc})")
            running.done.wait()
            with self._lock:
                self._batch = None
                # An idle group must ping again within liveness_timeout_s from now.
                self._last_alive = time.monotonic()
            if running.error is not None:
                raise running.error
            assert running.results is not None
            return running.results
