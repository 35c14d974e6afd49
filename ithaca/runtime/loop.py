"""The denoising loop every model family runs, and what goes through it: ``Request``, ``Job``.

:class:`DenoisingLoop` knows no model family. The model layer's
:class:`ithaca.models.base.DenoisingPipeline` derives from it (with its defaults and the
request rules the families share), and a family fills the hooks:

- ``resolve(params) -> Request``: validated settings, the same on every rank;
- ``condition(request) -> dict``: text embeddings, encoded input images (runs only on
  the replica's rank 0, where the text encoder and the VAE live; the result is
  broadcast to the other ranks of the replica);
- ``prepare(requests, conds) -> Job``: initial latents, timesteps, forward inputs;
- ``predict(job, branch, t) -> noise prediction`` for one guidance branch (``job.step``
  is the step index);
- ``decode(job, latents) -> list[list[Image]]`` (rank 0 only);
- ``guide`` (the guidance rule), ``make_cache`` (a step cache on its transformer) and the
  LoRA targets (:class:`ithaca.runtime.lora.LoraHost`): defaults in the model layer.

The loop owns batching of compatible requests (:meth:`DenoisingLoop.generate`),
conditioning on the returning rank (:meth:`DenoisingLoop.conditions`), CFG-parallel
(``predict_branches``), per-step progress and partial-image previews, cancellation between
steps (agreed by the replica: :mod:`ithaca.runtime.agree`), resuming from a step
(:mod:`ithaca.runtime.checkpoint`), the final decode split over the VAE group, the step
cache (installed per cache settings and adapter set, its stats reduced over the CFG
ranks) and the rank's weights (loading, sharding, their size), without a host sync
inside the loop. Step-level batching across requests is :mod:`ithaca.runtime.stepping`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ithaca.cache import CacheStats, StepCache
from ithaca.config import CacheConfig
from ithaca.parallel import ParallelState, comm, idle_branch_warning, predict_branches
from ithaca.parallel.hsdp import HSDPInferenceConfig, HSDPMesh
from ithaca.parallel.tensor import tp_shard
from ithaca.parallel.vae import follow_encodes, lead_encodes, split_vae
from ithaca.runtime.agree import StopFlag, from_returning_rank
from ithaca.runtime.checkpoint import ResumeState, StepCheckpoint
from ithaca.runtime.loading import load_frozen
from ithaca.runtime.lora import LoraHost, adapter_summary
from ithaca.runtime.offload import Placement, parameter_bytes
from ithaca.runtime.progress import preview_steps, report_decode, up_block_chunks
from ithaca.types import (
    DecodeCallback,
    GenerationParams,
    GenerationResult,
    StepCallback,
    StepEvent,
)

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One request after validation and defaults; identical on every rank."""

    params: GenerationParams
    width: int
    height: int
    steps: int
    true_cfg_scale: float
    do_cfg: bool
    seed: int | None
    extra_key: tuple = ()
    """Family-specific settings two requests must share to run in one batch."""
    lora: tuple = ()
    """The LoRA adapters (resolved :class:`ithaca.types.LoraRef` s) the request applies."""

    def metadata(self, seed: int) -> dict[str, Any]:
        """The settings the request ran with, as its result reports them."""
        lora = {"lora": adapter_summary(self.lora)} if self.lora else {}
        cfg = self.true_cfg_scale if self.do_cfg else None
        return dict(seed=seed, width=self.width, height=self.height,
                    num_inference_steps=self.steps, true_cfg_scale=cfg, **lora)  # fmt: skip

    @property
    def batch_key(self) -> tuple:
        return (
            self.width,
            self.height,
            self.steps,
            self.do_cfg,
            self.true_cfg_scale,
            self.extra_key,
            self.lora,
        )


@dataclass
class Job:
    """A batch of compatible requests going through the loop together."""

    requests: list[Request]
    seeds: list[int]
    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: Any
    inputs: dict[str, Any] = field(default_factory=dict)
    """Family-specific forward inputs (embeddings per branch, shapes, ...)."""
    step: int = 0
    """The index of the step the loop is running (read by ``predict`` where a family
    switches per step, e.g. Wan2.2's experts, without a host read of ``t``)."""


class DenoisingLoop(LoraHost):
    """Generic ``generate``: group, condition, broadcast, denoise, decode."""

    fuse_batches: bool = True
    """Run compatible requests of one batch through shared forward passes (the default:
    2-3x the throughput). Matrix multiplies round differently with the batch size (CPU
    and GPU alike), so a fused request may differ from the same request alone within
    1/255; ``--batch-invariant`` turns this off so each request runs its own loop and
    gets exactly its solo bytes."""
    joins_mid_run: bool = True
    """Whether requests may join a running batch at a step boundary (step-level
    batching, :mod:`ithaca.runtime.stepping`); False where the loop decides per step
    from the batch's own schedule (Wan2.2's experts)."""

    def __init__(self, state: ParallelState, dtype: torch.dtype):
        self.state = state
        self.dtype = dtype
        self.device = state.device
        self.cache_default = CacheConfig()
        """The server's step cache; a request may override it."""
        self.step_cache: StepCache | None = None
        self.step_cache_key: tuple | None = None
        """``(CacheConfig, adapter set)`` of the installed ``step_cache``."""
        self.offloading = Placement(state.config, self.device)
        """Where the transformer, text encoders and VAE live (:mod:`ithaca.runtime.offload`)."""

    # -- family hooks (see the module docstring) ---------------------------------------
    def resolve(self, params: GenerationParams) -> Request:
        raise NotImplementedError

    def condition(self, request: Request) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, requests: list[Request], conds: list[dict[str, Any]]) -> Job:
        raise NotImplementedError

    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, job: Job, latents: torch.Tensor) -> list[list[Image.Image]]:
        raise NotImplementedError

    def guides(self, request: Request) -> bool:
        """Whether ``request`` runs guidance branches besides its conditional one (what
        admission costs and what the CFG-parallel idle warning asks). Default: true CFG;
        Bagel runs its branches inside ``predict``."""
        return request.do_cfg

    def step_guidance_scales(self, job: Job) -> list[float]:
        """The guidance scale of every step, decided before the loop (no host read of a
        device tensor inside it). Default: the request's scale at every step; Wan2.2's
        two-expert models use a second scale once the low-noise expert takes over."""
        return [job.requests[0].true_cfg_scale] * len(job.timesteps)

    def preview(self, job: Job, x0: torch.Tensor) -> list[Image.Image]:
        """One preview image per request of ``job`` from the x0 estimate (returning rank)."""
        return [images[0] for images in self.decode(job, x0)]

    def decode_chunks(self, job: Job, latents: torch.Tensor) -> tuple[list[torch.nn.Module], int]:
        """The modules whose forwards end one chunk of the final decode, and how many
        chunks there are (:mod:`ithaca.runtime.progress`): the image VAE's up-blocks."""
        return up_block_chunks(getattr(self, "vae", None))

    def fill_result(self, result: GenerationResult, request: Request, output) -> None:
        """Store one request's ``decode`` output (default: images) on its result."""
        result.images = output

    # -- the rank's weights --------------------------------------------------------------
    def load_transformer(self, cls, model: str, subfolder: str = "transformer", device=None):
        """The checkpoint's transformer on ``device`` (default: the rank's; the host when
        offloaded), frozen (:func:`ithaca.runtime.loading.load_frozen`), split as
        :meth:`weight_shard` says."""
        device = self.offloading.load_device("transformer") if device is None else device
        return load_frozen(cls, model, subfolder, device, self.dtype, self.weight_shard(cls))

    def weight_shard(self, cls):
        """How a model of class ``cls`` is split on the meta device before it is read, so
        each rank reads and keeps only its shards, or None: with ``use_hsdp``
        ``apply_hsdp_to_model`` bound to this pipeline's mesh (built once, shared by
        Wan2.2's experts, rebuilt with the state's groups; :mod:`ithaca.parallel.hsdp`),
        else the class's tensor-parallel plan (:mod:`ithaca.parallel.tensor`)."""
        config = HSDPInferenceConfig.from_parallel(self.state.config)
        if not config.enabled:
            return tp_shard(self.state, cls)
        if getattr(self, "hsdp", None) is None:
            self.hsdp = HSDPMesh(config, self.state)
        return self.hsdp.shard

    def memory(self) -> dict[str, int]:
        """This rank's weights: ``parameter_bytes`` held (a DTensor: its local shard),
        of which ``offloaded_bytes`` wait on the host for the device."""
        modules = [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]
        modules += list(getattr(self, "experts", None) or ())
        return {
            "parameter_bytes": parameter_bytes(modules),
            "offloaded_bytes": self.offloading.host_bytes,
        }

    # -- the step cache ----------------------------------------------------------------
    def configure_cache(self, cache: CacheConfig | None) -> None:
        """Set the default step cache (validated: a :class:`CacheConfig`)."""
        self.cache_default = cache or CacheConfig()

    def cache_settings(self, request: Request) -> CacheConfig:
        """The request's step cache: its own, else the server's."""
        params = request.params
        if params.cache_backend is not None or params.cache_config:
            return CacheConfig.from_dict(params.cache_backend, params.cache_config)
        return self.cache_default

    def install_cache(
        self, config: CacheConfig | None, lora: tuple = (), cache: StepCache | None = None
    ) -> StepCache | None:
        """The cache for ``config`` and the adapter set ``lora``, reinstalled only when
        either changes (each adapter set gets its own cache state); ``cache``: install this
        one for them instead of ``make_cache(config)`` (the TeaCache calibration probe).
        ``config`` None: remove it."""
        key = None if config is None else (config, lora)
        if key != self.step_cache_key or cache is not None:
            if self.step_cache is not None:
                self.step_cache.remove()
            self.step_cache, self.step_cache_key = cache, key
            if cache is None and config is not None and config.backend:
                self.step_cache = self.make_cache(config)
        return self.step_cache

    def cache_stats(self, cache: StepCache, do_cfg: bool, of: CacheStats | None = None) -> dict:
        """The metadata's ``cache`` entry: ``of`` one request's stats (a step batch), else
        the cache's whole run, summed over the CFG ranks (each saw one branch). On the
        rank's device (NCCL takes no CPU tensors); after the loop (no per-step sync)."""
        of = cache.stats if of is None else of
        counts = torch.tensor([of.computed, of.cached], dtype=torch.int64, device=self.device)
        if do_cfg and self.state.cfg.size > 1:
            comm.all_reduce(counts, self.state.cfg)
        computed, cached = (int(c) for c in counts)
        total = computed + cached
        return {
            "backend": cache.name,
            "computed_steps": computed,
            "cached_steps": cached,
            "hit_ratio": round(cached / total, 4) if total else 0.0,
        }

    # -- the loop ------------------------------------------------------------------------
    @property
    def is_returning_rank(self) -> bool:
        return self.state.replica.rank == 0

    @property
    def decodes(self) -> bool:
        """Whether this rank takes part in the final decode: the returning rank and, with
        ``vae_patch_parallel_size`` > 1, the rest of its VAE group (they hold the VAE)."""
        return self.state.vae.ranks[0] == self.state.replica.ranks[0]

    def generate(
        self,
        batch: list[GenerationParams],
        callback: StepCallback | None = None,
        on_decode: DecodeCallback | None = None,
    ) -> list[GenerationResult]:
        """Run ``batch``; results in batch order (empty on ranks other than the returning one).

        Requests with equal size, steps and guidance settings share one loop. A callback
        returning True cancels the whole batch: the unfinished requests come back without
        images and with ``metadata["cancelled"] = True``. ``on_decode`` hears the final
        decode's progress (:mod:`ithaca.runtime.progress`).
        """
        requests = [self.resolve(p) for p in batch]  # raises ValueError before any work
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            cache = self.cache_settings(r)
            # Unless fusing is on, every request runs its own loop (exact solo bytes). This
            # loop gives its cache one state for the whole batch, so a cached request runs
            # alone here (step batches give each request its own: runtime/stepping.py).
            alone = cache.backend is not None or not self.fuse_batches or r.params.checkpoint
            key = (*r.batch_key, cache, i if alone else None)
            groups.setdefault(key, []).append(i)
        results = [GenerationResult(request_id=p.request_id) for p in batch]
        cancelled = False
        for indices in groups.values():  # insertion order: the same on every rank
            members = [requests[i] for i in indices]
            if cancelled:
                outputs, meta = None, {"cancelled": True}
            else:
                outputs, meta = self.run_group(members, callback, on_decode)
                cancelled = bool(meta.get("cancelled"))
            for j, i in enumerate(indices):
                results[i].metadata.update(meta.get("per_request", [{}] * len(indices))[j])
                results[i].metadata["cancelled"] = bool(meta.get("cancelled"))
                if outputs is not None and self.is_returning_rank:
                    self.fill_result(results[i], requests[i], outputs[j])
        return results

    def conditions(self, requests: list[Request]) -> list[dict[str, Any]]:
        """Condition every request on the replica's rank 0, the results on every rank."""
        vae = getattr(self, "vae", None)

        def condition() -> list[dict[str, Any]]:
            with lead_encodes(vae, self.state.vae):  # input images split with the VAE group
                conds = [self.condition(r) for r in requests]
            for r, cond in zip(requests, conds, strict=True):
                cond["seed"] = r.seed if r.seed is not None else random.randrange(2**31)
            return conds

        def follow() -> None:  # the rest of the returning rank's VAE group
            if self.decodes:
                follow_encodes(vae, self.state.vae, self.device)

        conds = from_returning_rank(self.state, condition, follow)
        self.offloading.evict()  # the encoders back to the host (when offloaded)
        return conds

    def run_group(
        self,
        requests: list[Request],
        callback: StepCallback | None,
        on_decode: DecodeCallback | None = None,
    ):
        """One loop over compatible ``requests``: ``(outputs, meta)``, outputs None when
        cancelled (or off the returning rank), ``meta["per_request"]`` their metadata."""
        started = time.perf_counter()
        self.apply_loras(requests[0].lora)  # every rank, before the group's first forward
        cache = self.install_cache(self.cache_settings(requests[0]), requests[0].lora)
        conds = self.conditions(requests)
        t_cond = time.perf_counter() - started
        job = self.prepare(requests, conds)
        checkpoint, resume = StepCheckpoint.of(self, requests), None
        if checkpoint is not None and (saved := checkpoint.load(job)) is not None:
            resume = ResumeState(saved[0], saved[1])  # steps done, their latents
            conds[0]["seed"] = job.seeds[0] = saved[2]  # the seed the first run drew
        cancelled_at = self.denoise(job, callback, cache, resume, checkpoint)
        t_loop = time.perf_counter() - started - t_cond
        per_request = [r.metadata(c["seed"]) for r, c in zip(requests, conds, strict=True)]
        if cache is not None:
            stats = self.cache_stats(cache, requests[0].do_cfg)
            for m in per_request:
                m["cache"] = stats
        idle = idle_branch_warning(self.state, self.guides(requests[0]))  # per request: log, meta
        for r, m in zip(requests, per_request, strict=True) if idle else ():
            m["warnings"] = [idle]
            if self.is_returning_rank:
                logger.warning("request %s: %s", r.params.request_id, idle)
        meta: dict[str, Any] = {"per_request": per_request}
        if cancelled_at is not None:
            meta["cancelled"] = True
            for m in per_request:
                m["steps_done"] = cancelled_at
            return None, meta
        outputs = self.final_decode(job, on_decode)
        self.offloading.evict()  # between requests every offloaded component is on the host
        t_total = time.perf_counter() - started
        for m in per_request:
            m["timings"] = {"condition_s": t_cond, "denoise_s": t_loop, "total_s": t_total}
        return outputs, meta

    def denoise(
        self,
        job: Job,
        callback: StepCallback | None = None,
        cache: StepCache | None = None,
        resume: ResumeState | None = None,
        checkpoint: StepCheckpoint | None = None,
    ) -> int | None:
        """Run the steps of ``job`` (from ``resume.step`` with ``resume.latents``, if given),
        leaving the final latents in ``job.latents``. Returns the number of steps done if
        the callback cancelled, else None.

        No host sync per step: the guidance scales are decided before the loop, the
        cancel flag is agreed one step late (below), every tensor stays on the device.
        """
        total = len(job.timesteps)
        start = 0
        if resume is not None:
            if not 0 <= resume.step <= total:
                raise ValueError(f"resume step ({resume.step}) must be in [0, {total}]")
            start = resume.step
            job.latents = resume.latents.to(job.latents.device, job.latents.dtype)
        if cache is not None:
            cache.begin(total)
        previews_at: set[int] = set()
        for r in job.requests:
            previews_at |= preview_steps(total, r.params.partial_images)
        do_cfg = job.requests[0].do_cfg
        scales = self.step_guidance_scales(job)  # host floats, decided once
        stop = StopFlag(self.state, self.device)

        def predict(branch: int) -> torch.Tensor:
            t = job.timesteps[job.step]
            if cache is None:
                return self.predict(job, branch, t)
            with cache.step(job.step, branch):
                return self.predict(job, branch, t)

        job.scheduler.set_begin_index(start)
        for i in range(start, total):
            job.step = i
            t = job.timesteps[i]  # a 0-d device tensor: indexing reads nothing back
            positive, negative = predict_branches(self.state, predict, do_cfg)
            noise = self.guide(positive, negative, scales[i])
            latents = job.scheduler.step(noise, t, job.latents, return_dict=False)[0]
            asked = self.report_step(callback, job, i, noise, previews_at)
            job.latents = latents
            if checkpoint is not None:  # every few steps, on the returning rank
                checkpoint.after_step(i + 1, job)
            if stop.agreed(asked, last=i == total - 1):
                return i + 1
        return None

    def report_step(self, callback, job: Job, i: int, noise, previews_at: set[int]) -> bool:
        """Tell ``callback`` (returning rank) that step ``i`` of ``job`` is done, with a
        preview of the x0 estimate if ``i`` is in ``previews_at`` (``job.latents``: still
        the step's input); returns whether it asked to cancel."""
        if not self.is_returning_rank or callback is None:
            return False
        previews = None
        if i in previews_at:  # flow matching's x0 estimate: x_t - sigma_i * v
            sigma = job.scheduler.sigmas[i]
            x0 = (job.latents.float() - sigma * noise.float()).to(job.latents.dtype)
            previews = self.preview(job, x0)
        ids = [r.params.request_id for r in job.requests]
        return bool(callback(StepEvent(ids, i + 1, len(job.timesteps), previews)))

    def final_decode(self, job: Job, on_decode: DecodeCallback | None = None):
        """``decode`` of ``job.latents`` on every rank of the returning rank's VAE group, the
        VAE split by rows across them (exact: :mod:`ithaca.parallel.vae`); the output on
        the returning rank, None elsewhere. Previews decode on the returning rank alone.
        The returning rank reports the decode's start and each chunk through ``on_decode``."""
        if not self.decodes:
            return None
        report = on_decode if self.is_returning_rank else None
        ids = [r.params.request_id for r in job.requests]
        with (
            split_vae(getattr(self, "vae", None), self.state.vae),
            report_decode(self.decode_chunks(job, job.latents), ids, report, self.device),
        ):
            outputs = self.decode(job, job.latents)
        return outputs if self.is_returning_rank else None
