"""The engine: one bounded queue feeding one dispatcher thread per worker group.

``submit`` -> :class:`~ithaca.engine.scheduler.Scheduler` -> a dispatcher takes a
batch -> its :class:`~ithaca.engine.executor.Executor` runs it (in process or on a
torchrun group) -> per-request futures resolve. Step events flow back per request
(progress, previews) and each step's hook answers "cancel?" (True once every request
of the batch is cancelled).

Failure rule: when a group dies, its running batch fails with
:class:`EngineDeadError`; if no other group is alive the queued requests fail too (a
request never waits on a dead engine). Then the group restarts
(``on_worker_failure="restart"``) or ``on_fatal`` is called (``"exit"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

from ithaca.config import CacheConfig, ParallelConfig, ServerConfig
from ithaca.engine.admission import Cost, CostModel, admit, batch_cost, cost_of
from ithaca.engine.errors import (
    DrainingError,
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    GenerationFailedError,
    RequestCancelledError,
    WorkerGroupDiedError,
)
from ithaca.engine.executor import Executor
from ithaca.engine.metrics import EngineMetrics
from ithaca.engine.scheduler import EngineRequest, ProgressCallback, Scheduler
from ithaca.types import GenerationParams, GenerationResult, StepEvent

log = logging.getLogger(__name__)


def split_previews(event: StepEvent, batch: list[EngineRequest]) -> dict[str, list]:
    """Previews of one step event by request: one per request, or one per image."""
    if not event.previews:
        return {}
    previews = list(event.previews)
    by_id = {r.request_id: r for r in batch}
    ids = [rid for rid in event.request_ids if rid in by_id]
    if len(previews) == len(event.request_ids):
        return {rid: [p] for rid, p in zip(event.request_ids, previews, strict=True)}
    out, i = {}, 0
    for rid in ids:
        n = by_id[rid].weight
        out[rid] = previews[i : i + n]
        i += n
    return out


class Engine:
    """Queue, batching and supervision over one or more executors (data parallel)."""

    def __init__(
        self,
        executors: list[Executor],
        *,
        max_queue_size: int = 64,
        max_batch_size: int = 4,
        batch_wait_ms: float = 10.0,
        on_worker_failure: str = "restart",
        continuous: bool = False,
        metrics: EngineMetrics | None = None,
        on_fatal: Callable[[str], None] | None = None,
        max_request_seconds: float | None = None,
        max_request_memory_bytes: float | None = None,
        step_timeout_factor: float = 10.0,
        min_step_timeout_s: float = 10.0,
        step_timeout_s: float = 300.0,
    ):
        if not executors:
            raise ValueError("an engine needs at least one executor")
        self.executors = executors
        self.loras: dict[str, dict] = {}
        """The adapter table as of the last management command (names a request may use)."""
        self._lora_lock = threading.Lock()
        """Held by a management command and by a restarted group's replay of the table."""
        self.scheduler = Scheduler(max_queue_size, max_batch_size, batch_wait_ms)
        self.on_worker_failure = on_worker_failure
        self.continuous = continuous
        """Step-level batching: waiting requests join a running batch between steps."""
        self.metrics = metrics or EngineMetrics()
        self.on_fatal = on_fatal
        self.fatal_reason: str | None = None
        self._ready = [threading.Event() for _ in executors]
        self._reasons = ["" for _ in executors]
        self._stopping = threading.Event()
        self._draining = False
        self._threads: list[threading.Thread] = []
        self._running: set[EngineRequest] = set()
        self._lock = threading.Lock()
        self.max_request_seconds = max_request_seconds
        self.max_request_memory_bytes = max_request_memory_bytes
        self.costs = [
            CostModel(step_timeout_factor, min_step_timeout_s, step_timeout_s) for _ in executors
        ]

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float | None = None) -> None:
        for i in range(len(self.executors)):
            t = threading.Thread(
                target=self._dispatch, args=(i,), name=f"dispatch-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for ev in self._ready:
                while not ev.wait(0.1):
                    if self.fatal_reason:
                        raise EngineDeadError(self.fatal_reason)
                    if deadline is not None and time.monotonic() > deadline:
                        raise EngineNotReadyError("worker groups did not become ready in time")

    @property
    def ready(self) -> bool:
        """Weights loaded and every rank of every group joined; not draining."""
        return self.alive and not self._draining

    @property
    def alive(self) -> bool:
        """Every rank of every group is alive."""
        return all(
            ev.is_set() and ex.is_alive()
            for ev, ex in zip(self._ready, self.executors, strict=True)
        )

    @property
    def overdue(self) -> bool:
        """Some group's running step is later than its measured step time allows."""
        return any(ex.overdue() for ex in self.executors)

    def describe(self) -> list[dict]:
        return [ex.describe() for ex in self.executors]

    def _fatal(self, reason: str) -> None:
        self.fatal_reason = reason
        self._stopping.set()
        self.scheduler.close()
        log.error("the engine stops: %s", reason)
        for req in self.scheduler.take_all():
            self._fail(req, EngineDeadError("the engine stopped after a worker failure"))
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def begin_drain(self) -> None:
        """Stop taking requests; queued and running ones continue."""
        self._draining = True

    def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Drain for up to ``drain_timeout`` s, fail what is left, stop every group (bounded)."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (len(self.scheduler) or self._running):
            time.sleep(0.05)
        self._stopping.set()
        self.scheduler.close()
        for req in self.scheduler.take_all():
            self._fail(req, DrainingError("the server shut down before this request ran"))
        self.abort_running()
        for t in self._threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        for ex in self.executors:
            ex.shutdown()
        self.abort_running()

    @property
    def draining(self) -> bool:
        return self._draining

    def abort_running(self) -> None:
        """The drain ran out: waiting and running requests fail now with 503 (a running
        batch is cancelled at its next step or stopped with its group)."""
        with self._lock:
            running = [*self.scheduler.take_all(), *self._running]
        for req in running:
            req.cancelled.set()
            self._fail(req, DrainingError("the server shut down while this request ran"))

    # -- requests ------------------------------------------------------------------------

    def validate(self, params: GenerationParams) -> dict:
        """Check one request alone on the model (before it can join a batch), then admit it
        by cost. Blocking (a round trip to rank 0): call it off the event loop.

        Returns the resolved shape; raises GenerationFailedError (400) for the client's
        mistake and AdmissionError (400) for what cannot fit.
        """
        self._check_open()
        # A ready group only: a restarted one is alive before its adapter table is
        # replayed (:meth:`_start_executor`), and would call a POSTed adapter unknown.
        pairs = zip(self.executors, self._ready, strict=True)
        ready = [ex for ex, ev in pairs if ev.is_set() and ex.is_alive()]
        if not ready:
            raise EngineDeadError("no worker group is alive (restarting)")
        try:
            resolved = ready[0].validate(params)
        except WorkerGroupDiedError as exc:
            log.warning("validation on %s failed: %s", ready[0].name, exc)
            raise EngineDeadError("no worker group is alive (restarting)") from None
        self.admit(cost_of(params, resolved))
        return resolved

    def admit(self, cost: Cost) -> None:
        """Refuse (400) what the measured rates say would take too long or need too much
        memory (:func:`~ithaca.engine.admission.admit`)."""
        admit(self.costs, cost, self.max_request_seconds, self.max_request_memory_bytes)

    def _check_open(self) -> None:
        if self.fatal_reason:
            raise EngineDeadError("the engine stopped after a fatal worker failure")
        if self._draining or self._stopping.is_set():
            raise DrainingError("the server is shutting down and takes no new requests")
        if not any(ev.is_set() for ev in self._ready):
            raise EngineNotReadyError("the model is still loading; retry shortly")

    def submit(
        self,
        params: GenerationParams,
        on_progress: ProgressCallback | None = None,
        *,
        label: str = "-",
        resolved: dict | None = None,
    ) -> EngineRequest:
        self._check_open()
        if not any(ex.is_alive() for ex in self.executors):
            raise EngineDeadError("no worker group is alive (restarting)")
        params = dataclasses.replace(params, request_id=uuid.uuid4().hex)
        req = EngineRequest(params, on_progress, label=label, resolved=dict(resolved or {}))
        self.scheduler.add(req)
        self.metrics.requests.inc()
        self.metrics.waiting.set(len(self.scheduler))
        if self.continuous:  # a running step batch may take it at its next boundary
            for ex in self.executors:
                getattr(ex, "nudge", lambda: None)()
        return req

    def cancel(self, req: EngineRequest) -> None:
        """Cancel a request: at once if it still waits, else at the next denoising step."""
        req.cancelled.set()
        if self.scheduler.remove(req):
            self.metrics.waiting.set(len(self.scheduler))
            self._fail(req, RequestCancelledError("the request was cancelled"))

    def manage_lora(self, command) -> list[dict]:
        """Run a :class:`ithaca.types.LoraCommand` on every ready worker group (each
        between its batches); returns the adapter table, also kept in :attr:`loras`.
        A group that is restarting gets the table replayed before it serves
        (:meth:`_replay_loras`)."""
        with self._lora_lock:
            ready = [ex for ex, ev in zip(self.executors, self._ready, strict=True) if ev.is_set()]
            if not ready:
                raise EngineNotReadyError("the model is still loading; retry shortly")
            table: list[dict] = []
            for executor in ready:
                table = executor.manage_lora(command)
            self.loras = {entry["name"]: entry for entry in table}
            return table

    def _replay_loras(self, ex: Executor) -> None:
        """Bring a (re)started group's adapters to :attr:`loras`: it loaded ``--lora``
        at start; adapters POSTed since are loaded, DELETEd ones unloaded. An adapter
        whose file is gone is dropped from the table (logged), not retried forever."""
        from ithaca.types import LoraCommand

        have = {e["name"] for e in ex.manage_lora(LoraCommand("list"))}
        for name in have - set(self.loras):
            ex.manage_lora(LoraCommand("unload", name))
        for name, entry in list(self.loras.items()):
            if name in have:
                continue
            try:
                ex.manage_lora(LoraCommand("load", name, entry["path"], entry["scale"]))
            except GenerationFailedError as exc:
                log.error("%s: LoRA %r could not be reloaded, dropped: %s", ex.name, name, exc)
                del self.loras[name]
                for other in self.executors:
                    if other is not ex and other.is_alive():
                        with contextlib.suppress(EngineError):
                            other.manage_lora(LoraCommand("unload", name))

    def generate(self, params: GenerationParams, timeout: float | None = None) -> GenerationResult:
        """Blocking convenience: submit and wait."""
        return self.submit(params).future.result(timeout)

    def _fail(self, req: EngineRequest, error: Exception) -> None:
        if not req.future.done():
            self.metrics.failures.labels(getattr(error, "reason", "internal")).inc()
        req.finish(error=error)

    # -- dispatch ------------------------------------------------------------------------

    def _start_executor(self, i: int, first: bool) -> bool:
        ex = self.executors[i]
        try:
            ex.start()
            with self._lora_lock:  # the adapters POSTed (DELETEd) since start, before it serves
                if self.loras or getattr(getattr(ex, "spec", None), "loras", ()):
                    self._replay_loras(ex)
                self._ready[i].set()
        except Exception as exc:
            log.error("%s failed to start: %s", ex.name, exc)
            if first or self.on_worker_failure == "exit":
                self._fatal(f"{ex.name} failed to start: {exc}")
            return False
        self._reasons[i] = ""
        self.metrics.groups_alive.set(sum(e.is_alive() for e in self.executors))
        return True

    def _handle_death(self, i: int) -> None:
        ex = self.executors[i]
        reason = getattr(ex, "death_reason", "") or self._reasons[i] or "worker group died"
        self._ready[i].clear()
        self.metrics.groups_alive.set(sum(e.is_alive() for e in self.executors))
        if not any(e.is_alive() for e in self.executors):
            for req in self.scheduler.take_all():
                self._fail(req, EngineDeadError(_DIED))
            self.metrics.waiting.set(0)
        if self.on_worker_failure == "exit":
            self._fatal(f"{ex.name} died: {reason}")
            return
        ex.shutdown(timeout=1.0)
        backoff = 1.0
        while not self._stopping.is_set():
            log.warning("restarting %s after: %s", ex.name, reason)
            if self._start_executor(i, first=False):
                self.metrics.restarts.inc()
                return
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def _dispatch(self, i: int) -> None:
        ex = self.executors[i]
        if not self._start_executor(i, first=True):
            return
        while not self._stopping.is_set():
            if not ex.is_alive():
                self._handle_death(i)
                continue
            batch = self.scheduler.next_batch(timeout=0.25)
            if not batch:
                continue
            self.metrics.waiting.set(len(self.scheduler))
            if not ex.is_alive():
                for req in batch:
                    self._fail(req, EngineDeadError(_DIED))
                continue
            self._run(i, batch)

    def _run(self, i: int, batch: list[EngineRequest]) -> None:
        """Run one batch; a batch failing on a request's input reruns its requests alone."""
        try:
            failure = self._execute(i, batch)
            if (
                isinstance(failure, GenerationFailedError)
                and failure.kind == "invalid_request"
                and len(batch) > 1
            ):
                # One request's input poisoned the batch: every request gets its own answer.
                log.warning(
                    "a batch of %d failed on one request's input (%s); rerunning each alone",
                    len(batch),
                    failure,
                )
                for req in batch:
                    if not req.future.done() and self.executors[i].is_alive():
                        self._finish_alone(i, req)
                    elif not req.future.done():
                        self._fail(req, EngineDeadError(_DIED))
            elif failure is not None:
                for req in batch:
                    self._fail(req, failure)
        finally:
            with self._lock:
                self._running.difference_update(batch)

    def _finish_alone(self, i: int, req: EngineRequest) -> None:
        failure = self._execute(i, [req])
        if failure is not None:
            self._fail(req, failure)

    def _started(self, batch: list[EngineRequest]) -> None:
        start = time.monotonic()
        for req in batch:
            req.started = start
            self.metrics.queue_time.observe(start - req.arrival)
        with self._lock:
            self._running.update(batch)
        self.metrics.running.inc(len(batch))

    def _deliver(self, req: EngineRequest, result: GenerationResult | None, done: float) -> None:
        """Resolve one request of a finished batch (or of a step batch, as it leaves)."""
        if req.future.done():
            return
        if req.cancelled.is_set():
            self._fail(req, RequestCancelledError("the request was cancelled"))
        elif result is not None:
            self.metrics.e2e_latency.observe(done - req.arrival)
            self.metrics.observe_result(result.metadata)
            req.finished = done
            req.finish(result)
        else:
            self._fail(req, GenerationFailedError("the pipeline returned no result"))

    def _execute(self, i: int, batch: list[EngineRequest]) -> EngineError | None:
        """Run ``batch`` on executor ``i``; resolve the futures of a success, return the
        failure (client-safe message; details logged with the request ids) otherwise."""
        ex = self.executors[i]
        cost_model = self.costs[i]
        cost = batch_cost([cost_of(r.params, r.resolved) for r in batch])
        start = time.monotonic()
        self._started(batch)
        self.metrics.batch_size.observe(len(batch))
        last = [start, 0]  # time and index of the last step event
        stepwise = self.continuous and hasattr(ex, "execute_stepwise")

        def on_step(event: StepEvent) -> bool:
            now = time.monotonic()
            self.metrics.step_latency.observe(now - last[0])
            # The first step has warm-up; a step batch's members change (no fixed cost).
            if event.step == last[1] + 1 and event.step > 1 and not stepwise:
                cost_model.observe_step(cost, now - last[0])
            last[0], last[1] = now, event.step
            previews = split_previews(event, batch)
            for req in batch:
                if req.request_id not in event.request_ids:
                    continue
                req.step, req.total_steps = event.step, event.total_steps
                if req.on_progress is not None and not req.cancelled.is_set():
                    try:
                        req.on_progress(event.step, event.total_steps, previews.get(req.request_id))
                    except Exception:
                        log.exception("progress callback of %s failed", req.label)
            return all(req.cancelled.is_set() for req in batch if not req.future.done())

        def admit(accepts) -> list:
            """Step-level batching: the oldest waiting requests this batch accepts join
            (appended to ``batch`` in place, so the caller's bookkeeping sees them)."""
            room = self.scheduler.max_batch_size - sum(
                r.weight for r in batch if not r.future.done()
            )
            joined = self.scheduler.take_joiners(accepts, room)
            if joined:
                self.metrics.waiting.set(len(self.scheduler))
                self._started(joined)
                batch.extend(joined)
            return [req.params for req in joined]

        def on_done(result: GenerationResult) -> None:
            for req in batch:
                if req.request_id == result.request_id:
                    self._deliver(req, result, time.monotonic())

        labels = ",".join(r.label for r in batch)
        try:
            params = [req.params for req in batch]
            if stepwise:
                results = ex.execute_stepwise(params, on_step, admit, on_done)
            else:
                results = ex.execute(params, on_step, deadlines=cost_model.deadlines(cost))
        except WorkerGroupDiedError as exc:
            self._reasons[i] = str(exc)
            log.error("[%s] %s died while running the batch: %s", labels, ex.name, exc)
            return EngineDeadError(_DIED)
        except GenerationFailedError as exc:
            if exc.kind != "invalid_request":
                log.error("[%s] the pipeline failed on %s: %s", labels, ex.name, exc)
            return GenerationFailedError(str(exc), exc.kind, exc.param)
        except Exception:  # an executor bug: fail the batch, keep serving
            log.exception("[%s] %s raised outside the pipeline", labels, ex.name)
            return GenerationFailedError("executor error", "internal")
        finally:
            self.metrics.running.dec(len(batch))
        done = time.monotonic()
        if last[1] and not stepwise and not any(r.cancelled.is_set() for r in batch):
            cost_model.observe_decode(cost, done - last[0])
            cost_model.observe_memory(
                cost, (getattr(ex, "last_stats", None) or {}).get("peak_bytes", 0)
            )
        by_id = {res.request_id: res for res in results}
        for req in batch:
            self._deliver(req, by_id.get(req.request_id), done)
        return None


_DIED = "the worker group running this request failed; retry shortly"


def build_engine(
    server: ServerConfig,
    parallel: ParallelConfig,
    cache: CacheConfig | None = None,
    *,
    metrics: EngineMetrics | None = None,
    on_fatal: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    device_offset: int = 0,
) -> Engine:
    """One executor per data-parallel replica, each a worker group of
    ``cfg * ring * ulysses`` ranks (or in-process when ``server.executor == "inprocess"``).
    ``device_offset``: local GPUs taken by the models before this one (several models on
    one server each own their own devices)."""
    from ithaca.engine.executor import InProcessExecutor, PipelineSpec
    from ithaca.engine.group import WorkerGroupExecutor

    group = dataclasses.replace(parallel, data_parallel_size=1)
    spec = PipelineSpec(server.model, server.dtype, cache or CacheConfig(), group,
                        server.loras, server.max_loras, server.batch_invariant,
                        fuse_loras=server.lora_fuse == "auto")  # fmt: skip
    if server.compile:  # the cache beside the video jobs: a restart compiles nothing
        cache_dir = server.compile_cache_dir(server.state_dir)
        spec = dataclasses.replace(
            spec, compile_cache_dir=cache_dir, compile_sizes=server.compile_sizes
        )
    executors: list[Executor] = []
    for i in range(parallel.data_parallel_size):
        if server.executor == "inprocess":
            if parallel.data_parallel_size != 1:
                raise ValueError(
                    f"data_parallel_size ({parallel.data_parallel_size}) needs the torchrun "
                    "executor"
                )
            executors.append(InProcessExecutor(spec, name=f"inprocess-{i}"))
            continue
        group_env = dict(env or {})
        visible = _visible_devices(i, group.world_size // server.nnodes, device_offset)
        if visible is not None:
            group_env["CUDA_VISIBLE_DEVICES"] = visible
        port = None if server.master_port is None else server.master_port + i
        executors.append(
            WorkerGroupExecutor(
                spec,
                name=f"group-{i}",
                master_port=port,
                env=group_env,
                **{name: getattr(server, name) for name in _GROUP_SETTINGS},
            )
        )
    engine = Engine(
        executors,
        max_queue_size=server.max_queue_size,
        max_batch_size=server.max_batch_size,
        batch_wait_ms=server.batch_wait_ms,
        on_worker_failure=server.on_worker_failure,
        continuous=server.continuous_batching,
        metrics=metrics,
        on_fatal=on_fatal,
        max_request_seconds=server.max_request_seconds,
        max_request_memory_bytes=(
            None if server.max_request_memory_gb is None else server.max_request_memory_gb * 2**30
        ),
        step_timeout_factor=server.step_timeout_factor,
        min_step_timeout_s=server.liveness_timeout_s,
        step_timeout_s=server.step_timeout_s,
    )
    engine.loras = {  # what every rank loads at start (ithaca.engine.executor.load_pipeline)
        name: {"name": name, "path": path, "scale": scale} for name, path, scale in server.loras
    }
    return engine


_GROUP_SETTINGS = (
    "startup_timeout_s",
    "heartbeat_interval_s",
    "liveness_timeout_s",
    "step_timeout_s",
    "nnodes",
    "master_addr",
)
"""ServerConfig fields every worker group takes as they are, by the same name."""


def local_gpus(driver_dir: str = "/proc/driver/nvidia/gpus") -> list[str]:
    """This node's GPUs as ``CUDA_VISIBLE_DEVICES`` entries, found without CUDA (the front
    process imports no torch): one entry per directory the NVIDIA driver lists in
    ``driver_dir`` (a container sees its own GPUs only), or, when ``CUDA_VISIBLE_DEVICES``
    is set, its entries up to the first one CUDA would stop at (``-1``). [] without a
    driver: the worker groups run on the CPU."""
    try:
        count = len(os.listdir(driver_dir))
    except OSError:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not count or visible is None:
        return [str(d) for d in range(count)]
    entries = [d.strip() for d in visible.split(",")]
    stop = next((i for i, d in enumerate(entries) if not d or d.startswith("-")), len(entries))
    return entries[:stop]


def _visible_devices(group_index: int, per_node: int, offset: int = 0) -> str | None:
    """Data-parallel group ``i`` owns local GPUs ``offset + [i*per_node, (i+1)*per_node)``."""
    devices = local_gpus()
    if not devices:
        return None
    first = offset + group_index * per_node
    mine = devices[first : first + per_node]
    if len(mine) < per_node:
        raise ValueError(
            f"data-parallel group {group_index} needs GPUs {first}..{first + per_node - 1} "
            f"but only {len(devices)} are visible"
        )
    return ",".join(mine)
