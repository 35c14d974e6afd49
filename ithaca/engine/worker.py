"""The per-rank program of a worker group (``torchrun ... -m ithaca.engine.worker``).

Every rank builds its :class:`ParallelState` from the torchrun environment and loads
the pipeline. Rank 0 of the group connects to the front's local socket; the others
only ever hear from rank 0, by broadcast. The loop, on every rank, in lockstep:

    rank 0 picks the next command (a batch from the front, or a ping when idle)
    broadcast_object(command)                  # every rank, same order
    ping  -> all_reduce(1 element)             # proves every rank is here; rank 0 says "alive"
    batch -> pipeline.generate(batch, cb)      # SPMD; cb on rank 0: sends steps, reads cancels
             all_gather_object(status)         # every rank agrees whether the batch failed
             (failed, not the user's fault) -> every rank rebuilds its model groups
    stepwise -> generate_stepwise(batch, ...)  # continuous batching, then as a batch

Continuous batching (``stepwise``, :mod:`ithaca.runtime.stepping`): at a step boundary
rank 0 asks the front ``("admit", id, join_key)`` and waits for its ``("joiners", id,
params)`` (the engine takes the oldest waiting requests whose validated ``join_key``
equals the batch's) - only at the first boundary, after the front said a request is
waiting (``("waiting", id)``, sent when one is queued) or after a member left (room
freed); every other boundary costs no round trip. The decision reaches the other ranks
as a device-tensor broadcast (plus the joiners' parameters when some join). A request
that finished is sent at once, ``("done", id, result)``; the batch's final ``result``
holds the rest.

A rank that fails mid-forward (typically out of memory: rank 0 alone also holds the
text encoder and VAE) closes its model groups at once, so peers blocked in a
collective it will never reach fail too (gloo: immediately; NCCL: after
``collective_timeout_s``) instead of waiting for the step timeout. Metadata and the
status agreement travel on the control group (gloo), which model tensors never use,
so it stays in step; the request fails with the failing rank's error and the group
serves the next one.

READY: after loading, every rank reports ``{rank, pid, host, error}`` through an
all_gather_object; rank 0 forwards the list as ``("ready", ranks)`` or, if any rank
failed to load, ``("failed", message)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import socket
import sys
import threading
import traceback

import torch
import torch.distributed as dist

from ithaca.engine.executor import (
    ENV_CONFIG,
    ENV_SOCKET,
    ENV_TOKEN,
    classify_failure,
    describe_failure,
    failure_param,
    load_pipeline,
    peak_memory_bytes,
    rank_memory,
    release_memory,
    resolve_request,
    run_measured,
    spec_from_json,
)
from ithaca.engine.ipc import Channel, ChannelClosed
from ithaca.parallel.comm import broadcast_object
from ithaca.parallel.state import ParallelState
from ithaca.types import DecodeEvent

log = logging.getLogger("ithaca.worker")


class WorkerLoop:
    """The lockstep loop above; ``channel`` is set on rank 0 only."""

    def __init__(self, state: ParallelState, pipeline, channel: Channel | None, heartbeat_s: float):
        # One worker group serves one replica: its replica axis is the whole world.
        assert state.replica.size == state.world_size, "a worker group is one replica (dp=1)"
        self.state = state
        self.pipeline = pipeline
        self.channel = channel
        self.heartbeat_s = heartbeat_s
        self.cpu_group = state.cpu_group  # gloo twin of the world group on NCCL, else None
        self.inbox: queue.Queue = queue.Queue()
        self.joiners: queue.Queue = queue.Queue()  # the front's answers to "admit"
        self.ask: set[int] = set()  # step batches that ask for joiners at the next boundary
        self.cancelled: set[int] = set()
        self.front_gone = False
        self.peak = peak_memory_bytes()  # loading's peak; each batch opens a new window
        if channel is not None:
            threading.Thread(target=self._read_front, name="front-reader", daemon=True).start()

    @property
    def is_root(self) -> bool:
        return self.state.replica.rank == 0

    def _read_front(self) -> None:
        """Rank 0: commands go to the inbox, cancels take effect at the next step."""
        assert self.channel is not None
        while True:
            try:
                msg = self.channel.recv()
            except ChannelClosed:
                # The front died: cancel the running batch at its next step, then stop
                # every rank through the normal shutdown broadcast.
                self.front_gone = True
                self.inbox.put(("shutdown", "front closed the connection"))
                return
            if msg[0] == "cancel":
                self.cancelled.add(msg[1])
            elif msg[0] == "joiners":
                self.joiners.put(msg)
            elif msg[0] == "waiting":
                self.ask.add(msg[1])
            elif msg[0] == "validate":
                self._validate(msg[1], msg[2])
            else:
                self.inbox.put(msg)

    def _validate(self, vid: int, params) -> None:
        """Rank 0, on the reader thread: one request's ``resolve`` (pure, no collective),
        so a bad request is refused before it joins a batch and blocks no rank."""
        try:
            reply = ("validated", vid, True, "", resolve_request(self.pipeline, params), None)
        except Exception as exc:
            if not isinstance(exc, ValueError):
                log.error("validation of a request failed:\n%s", traceback.format_exc())
            kind, message = classify_failure(exc), describe_failure(exc)
            reply = ("validated", vid, False, kind, message, failure_param(exc))
        self._send(reply)

    def _send(self, message: tuple) -> None:
        """Rank 0 to the front; a vanished front is handled by the reader's shutdown."""
        assert self.channel is not None
        try:
            self.channel.send(message)
        except ChannelClosed:
            self.front_gone = True

    def _broadcast(self, obj):
        return broadcast_object(obj, self.state.replica, group=self.cpu_group)

    def run(self) -> None:
        while True:
            command = None
            if self.is_root:
                try:
                    command = self.inbox.get(timeout=self.heartbeat_s)
                except queue.Empty:
                    command = ("ping",)
            command = self._broadcast(command)
            kind = command[0]
            if kind == "shutdown":
                return
            if kind == "ping":
                # Every rank must reach this all_reduce: completing it proves all are alive.
                flag = torch.ones(1)
                if self.state.world_size > 1:
                    dist.all_reduce(flag, group=self.cpu_group)
                if self.is_root:
                    self._send(("alive", int(flag.item())))
            elif kind in ("batch", "stepwise"):
                self._run_batch(command[1], command[2], stepwise=kind == "stepwise")
            elif kind == "lora":  # adapter management: every rank, between batches
                self._run_batch(command[1], command[2], lora=True)
            else:
                raise AssertionError(f"unknown command {kind!r}")

    def _admit(self, batch_id: int, accepts) -> list:
        """Rank 0 at a step boundary: the joiners the front hands over (none once the
        front is gone). A round trip on the local socket, not a collective, made only
        when someone may join (see the module's docstring)."""
        if batch_id not in self.ask:
            return []
        self.ask.discard(batch_id)  # a request queued from here on nudges again
        self._send(("admit", batch_id, accepts.key))
        while not self.front_gone:
            try:
                _, answered, params = self.joiners.get(timeout=0.5)
            except queue.Empty:
                continue
            if answered == batch_id:
                return params
        return []

    def _stepwise(self, batch_id: int, sent: set[str]):
        """``generate(batch, callback)`` running :func:`generate_stepwise`; ``sent`` gets
        the ids of the results already sent to the front as their requests left."""
        from ithaca.runtime.stepping import generate_stepwise

        admit = on_done = None
        if self.is_root:
            admit = functools.partial(self._admit, batch_id)
            self.ask.add(batch_id)  # the first boundary asks: requests may wait already

            def on_done(result) -> None:
                sent.add(result.request_id)
                self.ask.add(batch_id)  # room freed: the waiting may fit now
                self._send(("done", batch_id, result))

        def generate(batch, callback):
            return generate_stepwise(self.pipeline, batch, callback, admit, on_done)

        return generate

    def _run_batch(self, batch_id: int, batch, lora: bool = False, stepwise=False) -> None:
        callback, generate, sent = None, self.pipeline.generate, set()
        if self.is_root:

            def callback(event) -> bool:
                self._send(("step", batch_id, event))
                return self.front_gone or batch_id in self.cancelled

            def on_decode(event: DecodeEvent) -> None:  # the front's decode clock
                self._send(("decode", batch_id, event.chunk, event.chunks))

            generate = functools.partial(self.pipeline.generate, on_decode=on_decode)
        if stepwise:
            generate = self._stepwise(batch_id, sent)

        # (ok, failure kind, message, raised in a collective, the request field it names)
        results, stats, status = None, {}, (True, "", "", False, None)
        try:
            if lora:
                results = self.pipeline.manage_lora(batch)
            else:
                results, stats = run_measured(generate, batch, callback)
                results = [r for r in results if r.request_id not in sent]
        except Exception as exc:
            log.error(
                "rank %d: batch %d failed:\n%s", self.state.rank, batch_id, traceback.format_exc()
            )
            kind, message = classify_failure(exc), describe_failure(exc)
            status = (False, kind, message, _in_collective(exc), failure_param(exc))
        # Here, not in the except block: its traceback still holds the request's tensors
        # and the groups its frames used.
        if not status[0]:
            if status[1] != "invalid_request" and self.state.world_size > 1:
                # Peers may wait in a collective this rank will never reach: release them.
                self.state.abort_groups()
            release_memory(self.state.device)
        # Every rank learns every rank's outcome (and its memory: no extra round trip),
        # so all move on together.
        self.peak = max(self.peak, peak_memory_bytes())
        status = (*status, rank_memory(self.pipeline, self.peak))
        statuses = [status]
        if self.state.world_size > 1:
            statuses = [None] * self.state.world_size
            dist.all_gather_object(statuses, status, group=self.cpu_group)
            if any(not s[0] and s[1] != "invalid_request" for s in statuses):
                self.state.rebuild_groups()  # every rank, same order: fresh model groups
        self.cancelled.discard(batch_id)
        self.ask.discard(batch_id)
        if not self.is_root:
            return
        # The cause first: an out-of-memory rank, then a rank that failed outside a
        # collective, not the peers its exit released.
        failed = sorted(
            ((r, s) for r, s in enumerate(statuses) if not s[0]),
            key=lambda item: (item[1][1] != "out_of_memory", item[1][3]),
        )
        if failed:
            rank, (_, failure_kind, message, _, param, _) = failed[0]
            if failure_kind != "invalid_request":  # the user's mistake needs no rank number
                message = f"rank {rank}: {message}"
            self._send(("error", batch_id, failure_kind, message, param))
        else:
            self._send(("result", batch_id, results, {**stats, "ranks": [s[5] for s in statuses]}))


def _in_collective(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside torch.distributed (a peer's failure seen here)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "torch/distributed" in tb.tb_frame.f_code.co_filename.replace(
        "\\", "/"
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec, heartbeat_s = spec_from_json(os.environ[ENV_CONFIG])
    rank = int(os.environ.get("RANK", "0"))
    channel = None
    if rank == 0:
        channel = Channel.connect(os.environ[ENV_SOCKET])
        channel.send(("hello", os.environ.get(ENV_TOKEN, ""), os.getpid()))
    state = ParallelState.from_env(spec.parallel)
    error = ""
    pipeline = None
    try:
        pipeline = load_pipeline(spec, state)
    except Exception:
        error = traceback.format_exc()
        log.error("rank %d failed to load the pipeline:\n%s", rank, error)
    me = {"rank": state.rank, "pid": os.getpid(), "host": socket.gethostname(), "error": error}
    me["memory"] = rank_memory(pipeline) if pipeline is not None else {}
    ranks = [me]
    if state.world_size > 1:
        ranks = [None] * state.world_size
        dist.all_gather_object(ranks, me, group=state.cpu_group)
    errors = [r for r in ranks if r["error"]]
    if errors:
        if channel is not None:
            channel.send(
                ("failed", f"rank {errors[0]['rank']} failed to load:\n{errors[0]['error']}")
            )
        return 1
    if channel is not None:
        keys = ("rank", "pid", "host", "memory")
        channel.send(("ready", [{k: r[k] for k in keys} for r in ranks]))
    loop = WorkerLoop(state, pipeline, channel, heartbeat_s)
    try:
        loop.run()
    except Exception:
        # A collective failed: a peer died or the group desynchronised. Nothing to resume,
        # and tearing down a broken process group can block: leave at once.
        log.error("rank %d: worker loop aborted:\n%s", rank, traceback.format_exc())
        if channel is not None:
            with contextlib.suppress(ChannelClosed):
                channel.send(("fatal", f"rank {rank}: {traceback.format_exc(limit=1)}"))
        _exit(1)
    if state.world_size > 1:
        dist.destroy_process_group()
    # Nothing is left to flush or release: skip the interpreter's teardown of torch and
    # the model (seconds of CPU per rank on a busy host, and the front waits for it).
    _exit(0)
    return 0


def _exit(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
