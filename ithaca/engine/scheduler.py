"""The bounded request queue and the batching rule.

Requests that can share one forward pass have equal :func:`batch_key` (same size,
steps, guidance settings, cache; edits with input images always run alone). The
rule, which is also the fairness guarantee:

* every batch is built around the **oldest** waiting request (the head);
* it takes compatible requests from anywhere in the queue, in arrival order, until
  ``max_batch_size`` images;
* if the batch is not full it waits for company at most until ``batch_wait_ms``
  after the head arrived.

So an incompatible head never blocks the requests behind it for more than one batch,
and no request is overtaken forever: a request at queue position ``k`` runs within
``k`` batches of its group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ithaca.engine.errors import QueueFullError
from ithaca.types import GenerationParams, GenerationResult

ProgressCallback = Callable[[int, int, list | None], None]
"""``(step, total_steps, previews for this request or None)`` from the engine thread."""


def batch_key(params: GenerationParams) -> tuple:
    """Requests with equal keys can run in one forward pass."""
    if params.images:  # edits: input images differ in size and conditioning length
        return ("alone", params.request_id)
    cache = tuple(sorted((params.cache_config or {}).items()))
    return (
        params.width,
        params.height,
        params.num_inference_steps,
        params.guidance_scale,
        params.true_cfg_scale,
        params.negative_prompt is not None,
        params.num_frames,
        params.fps,
        params.guidance_scale_2,
        params.flow_shift,
        params.cache_backend,
        repr(cache),
    )


@dataclass(eq=False)
class EngineRequest:
    """One submitted request as the engine tracks it."""

    params: GenerationParams
    on_progress: ProgressCallback | None = None
    future: Future = field(default_factory=Future)
    arrival: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total_steps: int = 0
    label: str = "-"
    """The HTTP request id, for log lines about this request."""
    resolved: dict = field(default_factory=dict)
    """The model's defaults for this request (width, height, steps, ...) once validated."""

    def __post_init__(self) -> None:
        self.key = batch_key(self.params)

    @property
    def request_id(self) -> str:
        return self.params.request_id

    @property
    def weight(self) -> int:
        return max(1, self.params.num_images)

    def finish(self, result: GenerationResult | None = None, error: Exception | None = None):
        """Resolve the future once (later calls are ignored)."""
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class Scheduler:
    """Thread-safe bounded FIFO that hands out batches by the rule above."""

    def __init__(self, max_queue_size: int, max_batch_size: int, batch_wait_ms: float):
        self.max_queue_size = max_queue_size
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._queue: list[EngineRequest] = []
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def add(self, request: EngineRequest) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue_size:
                raise QueueFullError(
                    f"the queue is full ({self.max_queue_size} requests waiting); retry later"
                )
            self._queue.append(request)
            self._cond.notify_all()

    def remove(self, request: EngineRequest) -> bool:
        """Take a still-waiting request out of the queue; False if it already left."""
        with self._cond:
            if request in self._queue:
                self._queue.remove(request)
                return True
            return False

    def take_all(self) -> list[EngineRequest]:
        with self._cond:
            out, self._queue = self._queue, []
            return out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _compatible(self, head: EngineRequest) -> list[EngineRequest]:
        batch, images = [head], head.weight
        for req in self._queue[1:]:
            if req.key == head.key and images + req.weight <= self.max_batch_size:
                batch.append(req)
                images += req.weight
        return batch

    def take_joiners(
        self, accepts: Callable[[GenerationParams, dict], bool], room: int
    ) -> list[EngineRequest]:
        """Step-level batching: the waiting requests that join a running batch now.

        ``accepts(params, resolved)`` sees each request with its validation (``resolved``,
        which may carry the model's ``join_key``). Oldest first, and only from the head of
        the queue: the first request the batch
        does not ``accept`` (or that does not fit in ``room`` images) stops the joins, so
        a waiting incompatible request is never overtaken by later ones; the running
        batch drains and it runs next.
        """
        with self._cond:
            joined = []
            for req in self._queue:
                fits = req.weight <= room and not req.cancelled.is_set()
                if not fits or not accepts(req.params, req.resolved):
                    break
                joined.append(req)
                room -= req.weight
            del self._queue[: len(joined)]
            return joined

    def next_batch(self, timeout: float) -> list[EngineRequest]:
        """Block up to ``timeout`` s for a batch; ``[]`` when none (or closed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return []
                self._cond.wait(remaining)
            while True:
                head = self._queue[0]
                batch = self._compatible(head)
                images = sum(r.weight for r in batch)
                wait = head.arrival + self.batch_wait_s - time.monotonic()
                if images >= self.max_batch_size or wait <= 0 or self._closed:
                    break
                self._cond.wait(wait)
                if not self._queue:  # everything was cancelled while we waited
                    return []
            for req in batch:
                self._queue.remove(req)
            return batch
