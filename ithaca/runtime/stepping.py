"""Step-level (continuous) batching: requests join a running batch at a step boundary.

Written once for every family on top of the hooks of
:class:`ithaca.runtime.loop.DenoisingLoop` (it knows no family and imports no model
code: ``pipe`` is any family's pipeline). A
running batch is a list of slots, one per request, each with its own job from
``prepare([request])``: its seeded noise, scheduler, timesteps, step count and guidance
scale. Every step runs ONE fused forward over all slots: the family's ``prepare`` builds
the batch's inputs for the current members (rebuilt only when membership changes), the
latents are the slots' own, and the timestep is a ``(rows,)`` tensor with each row at
its own step (the families' ``t.expand(B)`` takes it as it is). The guidance scale is a
float when every slot shares it (so the forward and guidance are exactly the fused
loop's) and a per-row tensor otherwise. Each slot's scheduler steps its own rows; a
slot that reaches its last step is decoded and handed to ``on_done`` at once.

At each step boundary the returning rank makes one decision, ``(cancel, joiners)``: the
engine's ``admit(accepts)`` hands the oldest waiting requests this batch ``accepts``
(same size, model and step-cache settings, no LoRA, no input images). With several
ranks the decision is broadcast (:func:`ithaca.runtime.agree.agree_boundary`) so every
rank joins and leaves at the same step and reaches the joiners' conditioning broadcast
in the same order.

Step caches (TeaCache, Cache-DiT, TaylorSeer) keep their state per request
(:class:`ithaca.cache.Rows`): each forward tells the cache which rows are which request
at which of its own steps, each request decides by its own rule, and where they differ
only the computing rows run the skipped blocks. A request leaves with its own cache
stats; a cached request joins a batch with the same cache settings and ends with its
solo cached result.

Compatibility is :func:`join_key`: width, height, CFG on/off, the family's extra key and
the cache settings; steps and the guidance scale may differ. A family whose loop decides
per step from its schedule (Wan2.2's experts) sets ``joins_mid_run = False`` and runs
fused whole batches instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ithaca.cache import Rows
from ithaca.parallel import predict_branches
from ithaca.runtime.agree import agree_boundary
from ithaca.runtime.loop import DenoisingLoop, Job, Request
from ithaca.runtime.progress import preview_steps
from ithaca.types import (
    GenerationParams,
    GenerationResult,
    StepCallback,
    known_join,
)

Admit = Callable[["Accepts"], list[GenerationParams]]
"""``admit(accepts)`` (returning rank): waiting requests that join at this boundary, taken
oldest first while ``accepts(params, resolved)`` them (the engine also bounds them by free
batch rows)."""
Done = Callable[[GenerationResult], None]
"""``on_done(result)`` (returning rank): a request finished at this step boundary."""


def join_key(pipe: DenoisingLoop, request: Request) -> tuple:
    """What two requests must share to run in one step batch (steps and scale may differ)."""
    alone = bool(request.params.images) or bool(request.lora) or not pipe.joins_mid_run
    return (
        request.width,
        request.height,
        request.do_cfg,
        request.extra_key,
        pipe.cache_settings(request),
        id(request) if alone else None,
    )


def shared_join_key(pipe: DenoisingLoop, request: Request) -> tuple | None:
    """:func:`join_key` as plain data for another process (the front of a worker group
    compares it without the model), or None when the request never joins."""
    key = join_key(pipe, request)
    return key if key[-1] is None else None


@dataclass(frozen=True)
class Accepts:
    """The running batch's join rule, ``accepts(params, resolved=None)``: ``resolved``
    (the engine's validation of the request) may carry its ``join_key``, else the
    request is resolved here. ``key`` is what a worker group's front compares."""

    pipe: DenoisingLoop
    key: tuple

    def __call__(self, params: GenerationParams, resolved: dict | None = None) -> bool:
        known = known_join(self.key, resolved)
        if known is not None:
            return known
        try:
            request = self.pipe.resolve(params)
        except ValueError:
            return False  # it fails on its own, in a batch of its own
        return join_key(self.pipe, request) == self.key


@dataclass
class _Slot:
    request: Request
    cond: dict[str, Any]
    job: Job
    """The request's own job: scheduler, timesteps and (updated each step) latents."""
    joined_at: int
    """The batch step at which the request joined (0: it started the batch)."""
    step: int = 0
    previews_at: set[int] = field(default_factory=set)

    @property
    def rows(self) -> int:
        return self.job.latents.shape[0]

    @property
    def done(self) -> bool:
        return self.step == len(self.job.timesteps)


class StepBatch:
    """One running step batch on one rank (every rank of the replica runs its twin)."""

    def __init__(
        self,
        pipe: DenoisingLoop,
        callback: StepCallback | None,
        admit: Admit | None,
        on_done: Done | None,
    ):
        self.pipe = pipe
        self.callback = callback
        self.admit = admit
        self.on_done = on_done
        self.slots: list[_Slot] = []
        self.key: tuple | None = None
        self.cache = None  # the batch's step cache (its settings are part of the key)
        self.fused: Job | None = None  # the members' inputs; None after a membership change
        self.scale: torch.Tensor | None = None  # per-row guidance scales of these members
        self.batch_step = 0
        self.results: dict[str, GenerationResult] = {}
        self.refused: list[GenerationParams] = []
        """Joiners this batch turned down after all (the front's key was stale): they
        run after it, in batches of their own."""

    # -- membership ------------------------------------------------------------------
    def start(self, requests: list[Request]) -> None:
        """Begin the batch with resolved ``requests``: the first one's key is the batch's."""
        self.key = join_key(self.pipe, requests[0])
        self._join(requests)

    def join(self, params: list[GenerationParams]) -> None:
        """Every rank, same order: the joiners this rank resolves to this batch's key."""
        requests = []
        for p in params:
            request = self.pipe.resolve(p)
            if join_key(self.pipe, request) == self.key:
                requests.append(request)
            else:
                self.refused.append(p)
        self._join(requests)

    def _join(self, requests: list[Request]) -> None:
        if not requests:
            return
        conds = self.pipe.conditions(requests)  # a broadcast: every rank, same order
        for r, c in zip(requests, conds, strict=True):
            job = self.pipe.prepare([r], [c])
            job.scheduler.set_begin_index(0)
            slot = _Slot(r, c, job, self.batch_step)
            slot.previews_at = preview_steps(len(job.timesteps), r.params.partial_images)
            self.slots.append(slot)
        self.fused = None

    # -- one step ----------------------------------------------------------------------
    def _fused_job(self) -> Job:
        if self.fused is None:
            self.fused = self.pipe.prepare(
                [s.request for s in self.slots], [s.cond for s in self.slots]
            )
            self.scale = None  # the members changed: the per-row scales too
        self.fused.latents = torch.cat([s.job.latents for s in self.slots])
        return self.fused

    def _scale(self, like: torch.Tensor) -> float | torch.Tensor:
        """The guidance scale: a float when all slots share it, else one per row, copied
        to the device once per membership (a host-to-device copy blocks on CUDA)."""
        scales = [s.request.true_cfg_scale for s in self.slots]
        if len(set(scales)) == 1:
            return scales[0]
        if self.scale is None:
            rows = [v for v, s in zip(scales, self.slots, strict=True) for _ in range(s.rows)]
            shape = (len(rows),) + (1,) * (like.ndim - 1)
            self.scale = torch.tensor(rows, dtype=like.dtype, device=like.device).view(shape)
        return self.scale

    def step(self) -> bool:
        """One fused forward, each slot's scheduler step; returns whether to cancel."""
        pipe = self.pipe
        job = self._fused_job()
        # (rows,): every row at its own request's step; 0-d indexing reads nothing back
        t = torch.cat([s.job.timesteps[s.step].expand(s.rows) for s in self.slots])
        job.step = self.batch_step
        do_cfg = self.slots[0].request.do_cfg
        rows = [Rows(id(s), s.rows, s.step, len(s.job.timesteps)) for s in self.slots]

        def predict(branch: int) -> torch.Tensor:
            if self.cache is None:
                return pipe.predict(job, branch, t)
            with self.cache.step(self.batch_step, branch, rows):  # each request its own
                return pipe.predict(job, branch, t)

        positive, negative = predict_branches(pipe.state, predict, do_cfg)
        noise = pipe.guide(positive, negative, self._scale(positive))
        asked, start = False, 0
        for s in self.slots:
            rows = noise[start : start + s.rows]
            start += s.rows
            i = s.step
            latents = s.job.scheduler.step(rows, s.job.timesteps[i], s.job.latents)[0]
            asked |= pipe.report_step(self.callback, s.job, i, rows, s.previews_at)
            s.job.latents = latents
            s.step += 1
        self.batch_step += 1
        return asked

    # -- leaving -------------------------------------------------------------------------
    def _result(self, slot: _Slot, started: float) -> GenerationResult:
        r = slot.request
        result = GenerationResult(request_id=r.params.request_id)
        result.metadata.update(
            r.metadata(slot.cond["seed"]),
            cancelled=False,
            batching={"mode": "continuous", "joined_at_batch_step": slot.joined_at},
        )
        result.metadata["timings"] = {"total_s": time.perf_counter() - started}
        return result

    def leave(self, started: float) -> None:
        """Decode the finished slots together (returning rank) and hand them over."""
        finished = [s for s in self.slots if s.done]
        if not finished:
            return
        self.slots = [s for s in self.slots if not s.done]
        self.fused = None
        results = [self._result(s, started) for s in finished]
        if self.cache is not None:  # every rank, same slots, same order (a cfg all_reduce)
            do_cfg = finished[0].request.do_cfg
            for s, res in zip(finished, results, strict=True):
                stats = self.cache.forget(id(s))
                res.metadata["cache"] = self.pipe.cache_stats(self.cache, do_cfg, stats)
        if self.pipe.decodes:  # the returning rank (and its VAE group, which splits it)
            job = self.pipe.prepare([s.request for s in finished], [s.cond for s in finished])
            job.latents = torch.cat([s.job.latents for s in finished])
            outputs = self.pipe.final_decode(job)
            for s, res, out in zip(finished, results, outputs, strict=True) if outputs else ():
                self.pipe.fill_result(res, s.request, out)
        for res in results:
            self.results[res.request_id] = res
            if self.on_done is not None and self.pipe.is_returning_rank:
                self.on_done(res)

    def decide(self, asked: bool) -> tuple[bool, list[GenerationParams]]:
        """The returning rank's ``(cancel, joiners)``, the same on every rank."""
        joiners: list[GenerationParams] = []
        if self.pipe.is_returning_rank and not asked and self.admit is not None:
            assert self.key is not None
            joiners = list(self.admit(Accepts(self.pipe, self.key)))
        return agree_boundary(self.pipe.state, asked, joiners)

    def cancel_rest(self) -> None:
        for s in self.slots:
            result = GenerationResult(request_id=s.request.params.request_id)
            result.metadata.update(cancelled=True, steps_done=s.step)
            self.results[result.request_id] = result
        self.slots = []

    def run(self, requests: list[Request]) -> None:
        started = time.perf_counter()
        # The base model and the batch's step cache: what a previous group installed is
        # replaced (every rank, in the same order, as ``run_group`` does).
        self.pipe.apply_loras(())
        self.start(requests)
        self.cache = self.pipe.install_cache(self.pipe.cache_settings(requests[0]))
        if self.cache is not None:
            self.cache.begin(0)  # no state left from an earlier run; each request's own
        while self.slots:
            asked = self.step()
            self.leave(started)
            cancel, joiners = self.decide(asked)
            if cancel:
                self.cancel_rest()
                self.refused += joiners  # taken from the queue: they still get an answer
                return
            self.join(joiners)


def generate_stepwise(
    pipe: DenoisingLoop,
    batch: list[GenerationParams],
    callback: StepCallback | None = None,
    admit: Admit | None = None,
    on_done: Done | None = None,
) -> list[GenerationResult]:
    """Run ``batch`` with step-level batching: requests compatible with the first one
    (and later ones ``admit`` hands over) share a step batch; the rest run as
    :meth:`DenoisingLoop.generate` runs them. Returns every result (the batch's and
    the joiners'), each also given to ``on_done`` when it finished."""
    requests = [pipe.resolve(p) for p in batch]  # raises ValueError before any work
    key = join_key(pipe, requests[0])
    # The head runs alone with input images, a LoRA or a family that cannot join.
    together = [key[-1] is None and join_key(pipe, r) == key for r in requests]
    joining = [r for r, j in zip(requests, together, strict=True) if j]
    rest = [r.params for r, j in zip(requests, together, strict=True) if not j]
    results: dict[str, GenerationResult] = {}
    if joining:
        stepper = StepBatch(pipe, callback, admit, on_done)
        stepper.run(joining)
        results.update(stepper.results)
        rest += stepper.refused
    if rest:
        for res in pipe.generate(rest, callback):
            results[res.request_id] = res
            if on_done is not None and pipe.is_returning_rank:
                on_done(res)
    ordered = [results.pop(p.request_id) for p in batch]
    return ordered + list(results.values())
