"""A reusable group of spawned gloo ranks for multi-process tests and benchmarks.

Spawning a process and importing torch costs seconds on a 2-core machine, so a
:class:`WorkerPool` starts its ranks once, initialises the default gloo group once,
and then runs any number of module-level functions on every rank::

    pool = WorkerPool(4)
    results = pool.run(my_function, arg)   # my_function(arg) on ranks 0..3, in rank order

Functions build their :class:`~ithaca.parallel.state.ParallelState` with
:func:`parallel_state`, which releases its groups afterwards so the pool can serve
the next layout. A rank that raises or hangs breaks the pool: every rank is killed
and the caller gets the traceback (a broken collective cannot be resumed).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ithaca.config import ParallelConfig
from ithaca.parallel.state import ParallelState


class WorkerError(RuntimeError):
    """A rank raised, died or did not answer in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """Processes forked from one fork server that imported torch once (spawn imports it in
    every rank: an 8-rank pool took 39 s to start on a loaded 2-core machine, 13 s so)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", __name__])
    return ctx


def _worker_main(rank: int, world_size: int, port: int, tasks, results, threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:  # report everything; the pool is torn down by the caller
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()
    results.close()
    results.join_thread()  # everything put is flushed; then skip the interpreter's teardown,
    os._exit(0)  # which costs seconds with torch loaded (x every rank of every pool)


class WorkerPool:
    """``world_size`` spawned ranks sharing one gloo default group."""

    def __init__(self, world_size: int, threads: int = 1, start_timeout: float = 120.0):
        self.world_size = world_size
        ctx = _context()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, port, self._tasks[rank], self._results, threads),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", start_timeout)

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn, *args, timeout: float = 300.0, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; results in rank order."""
        if not self.alive:
            raise WorkerError("the worker pool is closed or a rank has died")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect("ok", timeout)

    def _collect(self, expected: str, timeout: float) -> list:
        out: list = [None] * self.world_size
        pending = set(range(self.world_size))
        while pending:
            try:
                rank, status, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise WorkerError(
                    f"ranks {sorted(pending)} did not answer within {timeout} s"
                ) from None
            if status == "error":
                self.close()
                raise WorkerError(f"rank {rank} raised:\n{value}")
            assert status == expected, (status, expected)
            out[rank] = value
            pending.discard(rank)
        return out

    def stop(self) -> None:
        """Ask every rank to leave (without waiting): pools stopped together exit together."""
        for q in self._tasks:
            with contextlib.suppress(Exception):
                q.put(None)

    def close(self) -> None:
        self.stop()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []


@contextlib.contextmanager
def parallel_state(config: ParallelConfig):
    """Build the groups of ``config`` over the default group; release them after."""
    state = ParallelState.build(config)
    try:
        yield state
    finally:
        state.destroy()


def assert_sharded(held: list[tuple[int, int, int]], full: int, shard: int, label: str) -> None:
    """``held``: every rank's ``(parameter bytes, shard world size, shard rank)`` of one model
    sharded over groups of ``shard`` ranks (``ithaca.parallel.hsdp``'s ``parameter_bytes``,
    ``get_fully_shard_world_size``, ``get_fully_shard_rank``), against the unsharded model's
    ``full`` bytes: each shard rank held once per group, every rank at most 1/shard of the
    model + 2% (a unit's rows split unevenly), and a group's shards adding up to the whole."""
    groups = len(held) // shard
    assert sorted(rank for _, _, rank in held) == sorted(list(range(shard)) * groups), (label, held)
    assert all(size == shard for _, size, _ in held), (label, held, shard)
    for nbytes, _, _ in held:
        assert nbytes <= full / shard * 1.02, (label, nbytes, full, shard)
    assert sum(nbytes for nbytes, _, _ in held) == full * groups, (label, held, full)
