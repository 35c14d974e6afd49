"""Executors run batches on a pipeline: in this process, or on a torchrun worker group.

Both implement :class:`Executor`; the engine cannot tell them apart. The in-process
executor is the twin of :class:`~ithaca.engine.group.WorkerGroupExecutor` for tests
and the offline Python API (one rank, no subprocess).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ithaca.config import CacheConfig, ParallelConfig
from ithaca.engine.errors import GenerationFailedError, WorkerGroupDiedError
from ithaca.types import GenerationParams, GenerationResult, ParamError, Pipeline, StepEvent

log = logging.getLogger(__name__)

StepHandler = Callable[[StepEvent], bool]
"""The engine's per-step hook: returns True when every request of the batch is cancelled."""


@dataclass(frozen=True)
class PipelineSpec:
    """What every rank needs to build the same pipeline (plain data; crosses processes)."""

    model: str | None = None
    """Checkpoint / hub id, ``None`` for the embedded default, or ``package.module:factory``
    for a custom pipeline factory called as ``factory(state, dtype=, cache_backend=,
    cache_config=)`` (how tests plug in a pipeline double)."""
    dtype: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loras: tuple[tuple[str, str, float], ...] = ()
    """LoRA adapters ``(name, path, scale)`` every rank loads after the model (``--lora``)."""
    max_loras: int | None = None
    """At most this many adapters resident (LRU, the rest reloaded on demand)."""
    batch_invariant: bool = False
    """Each request of a batch runs its own loop (exact solo bytes) instead of fused."""
    fuse_loras: bool = False
    """Merge the active adapter set into the weights while a run of loops uses it."""
    compile_cache_dir: str | None = None
    """``--compile``: compile the repeated blocks, inductor's cache in this directory,
    warmed up for ``compile_sizes`` (empty: the model's default size); None: eager."""
    compile_sizes: tuple[tuple[int, int], ...] = ()


PLACEMENT_FIELDS = ("text_encoder_placement", "vae_placement", "cpu_offload", "layerwise_offload")

ENV_CONFIG = "ITHACA_WORKER_CONFIG"
"""The environment the front gives a worker group: the spec as JSON (``spec_to_json``),
rank 0's socket to the front and its token (:mod:`ithaca.engine.ipc`); torch-free, so the
front process never imports the worker module."""
ENV_SOCKET = "ITHACA_FRONT_SOCKET"
ENV_TOKEN = "ITHACA_FRONT_TOKEN"


def spec_to_json(spec: PipelineSpec, heartbeat_interval_s: float) -> str:
    return json.dumps(
        {
            "model": spec.model,
            "dtype": spec.dtype,
            "cache_backend": spec.cache.backend,
            "cache_config": spec.cache.as_dict(),
            "parallel": {
                "ulysses_degree": spec.parallel.ulysses_degree,
                "ring_degree": spec.parallel.ring_degree,
                "cfg_parallel_size": spec.parallel.cfg_parallel_size,
                "tensor_parallel_size": spec.parallel.tensor_parallel_size,
                "vae_patch_parallel_size": spec.parallel.vae_patch_parallel_size,
                "attention_backend": spec.parallel.attention_backend,
                "collective_timeout_s": spec.parallel.collective_timeout_s,
                "use_hsdp": spec.parallel.use_hsdp,
                "hsdp_shard_size": spec.parallel.hsdp_shard_size,
                "hsdp_replicate_size": spec.parallel.hsdp_replicate_size,
                **{k: getattr(spec.parallel, k) for k in PLACEMENT_FIELDS},
            },
            "heartbeat_interval_s": heartbeat_interval_s,
            "loras": [list(x) for x in spec.loras],
            "max_loras": spec.max_loras,
            "batch_invariant": spec.batch_invariant,
            "fuse_loras": spec.fuse_loras,
            "compile_cache_dir": spec.compile_cache_dir,
            "compile_sizes": [list(size) for size in spec.compile_sizes],
        }
    )


def spec_from_json(text: str) -> tuple[PipelineSpec, float]:
    raw = json.loads(text)
    spec = PipelineSpec(
        model=raw["model"],
        dtype=raw["dtype"],
        cache=CacheConfig.from_dict(raw["cache_backend"], raw["cache_config"]),
        parallel=ParallelConfig(**raw["parallel"]),
        loras=tuple(tuple(x) for x in raw.get("loras", ())),
        max_loras=raw.get("max_loras"),
        batch_invariant=bool(raw.get("batch_invariant", False)),
        fuse_loras=bool(raw.get("fuse_loras", False)),
        compile_cache_dir=raw.get("compile_cache_dir"),
        compile_sizes=tuple(tuple(size) for size in raw.get("compile_sizes", ())),
    )
    return spec, float(raw["heartbeat_interval_s"])


def default_model_path() -> str:
    """The embedded default model: the trained shapes checkpoint shipped in the package
    (``ithaca.models.shapes``); ``FileNotFoundError`` in an install without it."""
    from ithaca.models.shapes import shipped_checkpoint_path  # lazy: models is optional

    return shipped_checkpoint_path()


def load_pipeline(spec: PipelineSpec, state) -> Pipeline:
    """Build the pipeline of ``spec`` on this rank (collective if the model needs it)."""
    import torch

    model = spec.model
    kwargs = dict(
        dtype=getattr(torch, spec.dtype) if spec.dtype else None,
        cache_backend=spec.cache.backend,
        cache_config=spec.cache.as_dict(),
    )
    if model and ":" in model and not os.path.exists(model):
        module, _, attr = model.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        pipeline = factory(state, **kwargs)
    else:
        from ithaca.models.registry import load_pipeline as registry_load

        pipeline = registry_load(model or default_model_path(), state, **kwargs)
        if spec.loras or spec.max_loras:
            pipeline.max_loras = spec.max_loras
            for name, path, scale in spec.loras:
                pipeline.load_lora(name, path, scale)
        if spec.fuse_loras:
            pipeline.fuse_loras = True
    if hasattr(pipeline, "fuse_batches"):
        pipeline.fuse_batches = not spec.batch_invariant
    if spec.compile_cache_dir is not None:
        from ithaca.runtime.compiled import compile_pipeline, use_cache_dir, warm_up

        use_cache_dir(spec.compile_cache_dir)
        compile_pipeline(pipeline)
        warm_up(pipeline, [tuple(size) for size in spec.compile_sizes])  # every rank
    return pipeline


def classify_failure(exc: BaseException) -> str:
    """``invalid_request`` for the pipeline's ValueErrors (the user's fault),
    ``out_of_memory`` when a device ran out of memory, else ``internal``."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return "out_of_memory"
    return "invalid_request" if isinstance(exc, ValueError) else "internal"


def failure_param(exc: BaseException) -> str | None:
    """The request field a :class:`~ithaca.types.ParamError` names, else None: it travels
    with the failure to the error body's ``param``."""
    return exc.param if isinstance(exc, ParamError) else None


def describe_failure(exc: BaseException) -> str:
    """The message of a failed batch: a ValueError's or an out-of-memory's text reaches
    the client; anything else keeps its type and is only logged (``client_message``)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return (
            f"out of device memory ({first}); this request is too large for the layout: "
            f"lower the resolution, frame count or number of images, or serve with more "
            f"sequence-parallel ranks"
        )
    if isinstance(exc, ValueError):  # the client's mistake, in the model's own words
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def release_memory(device) -> None:
    """After a failure: drop the failed request's cached blocks so the next one fits."""
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


def resolve_request(pipeline, params: GenerationParams) -> dict:
    """One request checked alone by the pipeline's ``resolve`` (raises ValueError for the
    client's mistake), as plain data for admission: width, height, steps, frames, do_cfg,
    and ``join_key`` (what a step batch compares, None when the request never joins one)."""
    resolve = getattr(pipeline, "resolve", None)
    if resolve is None:
        return {}
    request = resolve(params)  # LoRA references too: ParamError 'lora' before any batch
    extra = getattr(request, "extra_key", ()) or ()
    frames = getattr(request, "num_frames", None) or next(
        (getattr(e, "num_frames", None) for e in extra if hasattr(e, "num_frames")), None
    )
    return {
        "width": getattr(request, "width", None),
        "height": getattr(request, "height", None),
        "steps": getattr(request, "steps", None),
        "frames": frames or params.num_frames,
        "do_cfg": bool(
            pipeline.guides(request)
            if hasattr(pipeline, "guides")
            else getattr(request, "do_cfg", False)
        ),
        "join_key": _join_key(pipeline, request),
    }


def _join_key(pipeline, request) -> tuple | None:
    if not hasattr(pipeline, "joins_mid_run"):  # not a DenoisingPipeline: no step batches
        return None
    from ithaca.runtime.stepping import shared_join_key  # lazy: models is optional

    return shared_join_key(pipeline, request)


def reset_peak_memory() -> None:
    """Start a new peak-memory window for this process (device memory on CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    # Writing 5 to clear_refs resets the kernel's peak RSS (VmHWM) of this process.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_bytes() -> int:
    """Peak memory of this process since :func:`reset_peak_memory` (0 when unknown)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rank_memory(pipeline, peak: int = 0) -> dict[str, int]:
    """This rank's memory, for ``/health``, the gauges and ``generate --verbose``:
    ``parameter_bytes`` its pipeline holds (a DTensor counts its local shard), of which
    ``offloaded_bytes`` wait on the host, and ``peak_memory_bytes``: the larger of ``peak``
    and the current window's (CUDA peak allocated, or peak RSS on the CPU)."""
    memory = getattr(pipeline, "memory", None)
    held = memory() if callable(memory) else {}
    return {
        "parameter_bytes": int(held.get("parameter_bytes", 0)),
        "offloaded_bytes": int(held.get("offloaded_bytes", 0)),
        "peak_memory_bytes": max(int(peak), peak_memory_bytes()),
    }


def run_measured(generate, batch, callback, *args) -> tuple[list[GenerationResult], dict]:
    """``generate(batch, callback, *args)`` (a pipeline's ``generate`` or
    ``generate_stepwise``) with the batch's peak memory growth (bytes) measured."""
    reset_peak_memory()
    base = peak_memory_bytes()
    results = generate(batch, callback, *args)
    return results, {"peak_bytes": max(0, peak_memory_bytes() - base)}


class Executor(Protocol):
    """Runs batches; raises :class:`WorkerGroupDiedError` when its ranks are gone."""

    name: str

    def start(self) -> None:
        """Load weights on every rank; return once all are READY (or raise)."""

    def validate(self, params: GenerationParams) -> dict:
        """Check one request alone (:func:`resolve_request`); raises
        :class:`GenerationFailedError` (``invalid_request``) for the client's mistake."""

    def execute(
        self, batch: list[GenerationParams], on_step: StepHandler, deadlines=None
    ) -> list[GenerationResult]:
        """Run one batch; results in any order, matched by ``request_id``. ``deadlines``
        (:class:`~ithaca.engine.admission.Deadlines`) bound the time without progress;
        ``last_stats`` then holds the batch's measured peak memory."""

    def overdue(self) -> bool:
        """The running step is later than expected (``/health`` turns 503)."""

    # Executors that run step-level batches also have ``execute_stepwise(batch, on_step,
    # admit, on_done)`` (:func:`ithaca.runtime.stepping.generate_stepwise` on the pipeline).

    def is_alive(self) -> bool: ...

    def describe(self) -> dict:
        """Ranks, pids and hosts for ``/health``."""

    def shutdown(self, timeout: float = 10.0) -> None: ...


class InProcessExecutor:
    """One rank in the calling process; ``execute`` runs on the caller's thread."""

    def __init__(
        self, spec: PipelineSpec, name: str = "inprocess-0", pipeline: Pipeline | None = None
    ):
        if spec.parallel.world_size != 1:
            raise ValueError(
                f"the in-process executor runs one rank; world size is {spec.parallel.world_size} "
                f"for {spec.parallel} (use the torchrun executor)"
            )
        self.spec = spec
        self.name = name
        self.pipeline = pipeline
        self._closed = False
        self._lock = threading.Lock()
        self.last_stats: dict = {}
        self._peak = 0
        """This process's peak memory over every batch (each batch resets the window)."""

    def start(self) -> None:
        if self.pipeline is None:
            from ithaca.parallel.state import ParallelState, default_device

            # The GPU when there is one (the registry then picks bf16), not the CPU.
            state = ParallelState.single(self.spec.parallel, default_device())
            self.pipeline = load_pipeline(self.spec, state)
        self._closed = False

    def validate(self, params: GenerationParams) -> dict:
        if self._closed or self.pipeline is None:
            raise WorkerGroupDiedError(f"{self.name} is not running")
        try:
            return resolve_request(self.pipeline, params)
        except ValueError as exc:
            raise GenerationFailedError(str(exc), "invalid_request", failure_param(exc)) from exc

    def execute(
        self, batch: list[GenerationParams], on_step: StepHandler, deadlines=None
    ) -> list[GenerationResult]:
        return self._run(lambda: run_measured(self.pipeline.generate, batch, on_step))

    def execute_stepwise(self, batch, on_step: StepHandler, admit, on_done):
        """``execute`` with step-level batching: ``admit(accepts)`` hands over joiners at
        step boundaries, ``on_done(result)`` gets each request as soon as it finished."""
        from ithaca.runtime.stepping import generate_stepwise  # lazy: models is optional

        def stepwise(*args):
            return generate_stepwise(self.pipeline, *args)

        return self._run(lambda: run_measured(stepwise, batch, on_step, admit, on_done))

    def _run(self, work):
        if self._closed or self.pipeline is None:
            raise WorkerGroupDiedError(f"{self.name} is not running")
        with self._lock:
            try:
                results, self.last_stats = work()
                self._peak = max(self._peak, peak_memory_bytes())
                return results
            except Exception as exc:
                if not isinstance(exc, ValueError):
                    log.exception("%s: pipeline failed", self.name)
                error = GenerationFailedError(
                    describe_failure(exc), classify_failure(exc), failure_param(exc)
                )
                error.__cause__ = exc
            # Outside the except block, whose traceback holds the request's tensors.
            error.__cause__.__traceback__ = None
            release_memory(getattr(self.pipeline, "device", None))
            raise error

    def overdue(self) -> bool:
        return False

    def manage_lora(self, command) -> list[dict]:
        """Run a :class:`ithaca.types.LoraCommand` between batches."""
        if self._closed or self.pipeline is None:
            raise WorkerGroupDiedError(f"{self.name} is not running")
        with self._lock:
            try:
                return self.pipeline.manage_lora(command)
            except Exception as exc:
                raise GenerationFailedError(
                    f"{type(exc).__name__}: {exc}", classify_failure(exc), failure_param(exc)
                ) from exc

    def is_alive(self) -> bool:
        return not self._closed and self.pipeline is not None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "alive": self.is_alive(),
            "status": "ok" if self.is_alive() else "down",
            "ranks": [{"rank": 0, "pid": os.getpid(), **self.memory()}],
        }

    def memory(self) -> dict[str, int]:
        if self.pipeline is None:
            return {}
        self._peak = max(self._peak, peak_memory_bytes())
        return rank_memory(self.pipeline, self._peak)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closed = True
