"""The denoising loop every model family reuses, and the batch bookkeeping around it.

The diffusers families (the image families and Wan2.2) stand on
:class:`ithaca.models.flow.FlowMatchPipeline`, which builds these hooks from a
:class:`ithaca.models.spec.FamilySpec`; Bagel, which diffusers lacks, fills them itself:

- ``resolve(params) -> Request``: validated settings, the same on every rank;
- ``condition(request) -> dict``: text embeddings, encoded input images (runs only on
  the replica's rank 0, where the text encoder and the VAE live; the result is
  broadcast to the other ranks of the replica);
- ``prepare(requests, conds) -> Job``: initial latents, timesteps, forward inputs;
- ``predict(job, branch, t) -> noise prediction`` for one guidance branch (``job.step``
  is the step index);
- ``decode(job, latents) -> list[list[Image]]`` (rank 0 only).

The loop owns CFG-parallel (``predict_branches``), batching of compatible requests,
per-step progress and partial-image previews, cancellation between steps (agreed by the
replica: :mod:`ithaca.runtime.agree`) and resuming from a step
(:mod:`ithaca.runtime.checkpoint`), without a host sync inside the loop. Step-level
batching across requests is :mod:`ithaca.runtime.stepping`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ithaca.cache import BlockCacheAdapter, CacheStats, StepCache, build_cache
from ithaca.config import CacheConfig
from ithaca.models.spec import DEFAULTS, plain_cfg
from ithaca.parallel import ParallelState, comm, idle_branch_warning, predict_branches
from ithaca.parallel.hsdp import HSDPInferenceConfig, HSDPMesh
from ithaca.parallel.tensor import tp_shard
from ithaca.parallel.vae import follow_encodes, lead_encodes, split_vae
from ithaca.runtime.agree import StopFlag, from_returning_rank
from ithaca.runtime.checkpoint import ResumeState, StepCheckpoint
from ithaca.runtime.loading import load_frozen
from ithaca.runtime.lora import LoraAdapters, adapter_summary
from ithaca.runtime.offload import Placement, parameter_bytes
from ithaca.runtime.progress import preview_steps, report_decode, up_block_chunks
from ithaca.types import (
    DecodeCallback,
    GenerationParams,
    GenerationResult,
    LoraCommand,
    ParamError,
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


class DenoisingPipeline:
    """Generic ``generate``: group, condition, broadcast, denoise, decode."""

    default_width: int = 1024
    default_height: int = 1024
    default_steps: int = 50
    default_true_cfg_scale: float = 4.0
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
        self._cache: StepCache | None = None
        self._cache_key: tuple | None = None
        """``(CacheConfig, adapter set)`` of the installed cache."""
        self.loras: LoraAdapters | None = None
        """The LoRA adapter table (:meth:`lora_table`), created on first use."""
        self.offloading = Placement(state.config, self.device)
        """Where the transformer, text encoders and VAE live (:mod:`ithaca.runtime.offload`)."""

    def take_defaults(self, defaults: Mapping[str, Any]) -> None:
        """Set the defaults a spec or a checkpoint states, by request field name
        (:data:`ithaca.models.spec.DEFAULTS`; other keys are not the loop's)."""
        for key, value in defaults.items():
            if key in DEFAULTS:
                setattr(self, DEFAULTS[key], value)

    def configure_cache(self, cache: CacheConfig | None) -> None:
        """Set the default step cache (validated: a :class:`CacheConfig`)."""
        self.cache_default = cache or CacheConfig()

    # -- LoRA adapters (ithaca.runtime.lora) -------------------------------------
    fuse_loras: bool = False
    """Merge the active adapter set into the weights while consecutive loops use it
    (faster steps); off: adapters run beside the base layers. Either way the base
    weights come back bit for bit when the set changes."""
    max_loras: int | None = None
    """At most this many adapters resident in the transformer (LRU); None: no bound."""

    def lora_targets(self) -> dict[str, torch.nn.Module]:
        """The transformers an adapter is loaded into, by the name a request's
        ``expert`` uses (Wan2.2: ``high_noise`` / ``low_noise``)."""
        return {"transformer": self.transformer}

    def lora_loader(self):
        """The diffusers pipeline class whose LoRA converters read this family's files."""
        return None

    def lora_fusable(self) -> bool:
        """Whether ``fuse_loras`` may merge adapters into the weights (not where weights
        are swapped in from host copies, which would drop the merge)."""
        return True

    def lora_table(self) -> LoraAdapters:
        if self.loras is None:
            runtimes = [r for r in (getattr(self, "runtimes", None) or [self.runtime]) if r]
            name = getattr(getattr(self, "spec", None), "name", type(self).__name__)

            def rebind() -> None:  # peft wrapped layers: hooks and caches follow
                for runtime in runtimes:
                    runtime.rebind()
                self._install_cache(None)

            self.loras = LoraAdapters(name, self.lora_loader(), self.lora_targets(), rebind,
                                      self.max_loras)  # fmt: skip
        return self.loras

    def load_lora(self, name: str, path: str, scale: float = 1.0) -> dict:
        """Add a named adapter (every rank of the group runs this, in the same order)."""
        return self.lora_table().add(name, path, scale)

    def unload_lora(self, name: str) -> None:
        self.lora_table().remove(name)

    def list_loras(self) -> list[dict]:
        return self.loras.listing() if self.loras is not None else []

    def manage_lora(self, command: LoraCommand) -> list[dict]:
        """Run one management command (the engine sends it to every rank); returns the
        adapter table afterwards."""
        if command.op == "load":
            self.load_lora(command.name, command.path, command.scale)
        elif command.op == "unload":
            self.unload_lora(command.name)
        elif command.op != "list":
            raise ValueError(f"LoRA command {command.op!r} must be load, unload or list")
        return self.list_loras()

    def _resolve_lora(self, params: GenerationParams) -> tuple:
        """``params.lora`` checked against the loaded adapters (``Request.lora``; a family's
        ``resolve`` calls it, so a LoRA request is known before it can join a batch)."""
        if not params.lora:
            return ()
        if self.loras is None:
            raise ParamError("lora", f"unknown LoRA {params.lora[0].name!r} (none loaded)")
        return self.loras.resolve(params.lora)

    # -- family hooks ----------------------------------------------------------
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

    def guide(
        self, positive: torch.Tensor, negative: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """Combine the branch predictions (``negative`` is None without CFG): the
        family's guidance rule, plain CFG unless it declares another."""
        return self.guidance_rule(positive, negative, scale)

    guidance_rule = staticmethod(plain_cfg)

    def step_guidance_scales(self, job: Job) -> list[float]:
        """The guidance scale of every step, decided before the loop (no host read of a
        device tensor inside it). Default: the request's scale at every step; Wan2.2's
        two-expert models use a second scale once the low-noise expert takes over."""
        return [job.requests[0].true_cfg_scale] * len(job.timesteps)

    def preview(self, job: Job, x0: torch.Tensor) -> list[Image.Image]:
        """One preview image per request of ``job`` from the x0 estimate (returning rank)."""
        return [images[0] for images in self.decode(job, x0)]

    # -- shared loading ----------------------------------------------------------
    def load_transformer(self, cls, model: str, subfolder: str = "transformer", device=None):
        """The checkpoint's transformer on ``device`` (default: the rank's; the host when
        offloaded), frozen (:func:`ithaca.runtime.loading.load_frozen`); with ``use_hsdp``
        or tensor parallelism split on the meta device first, so each rank reads and keeps
        only its shards (:mod:`ithaca.parallel.hsdp`, :mod:`ithaca.parallel.tensor`)."""
        device = self.offloading.load_device("transformer") if device is None else device
        shard = self.hsdp_shard() or tp_shard(self.state, cls)
        return load_frozen(cls, model, subfolder, device, self.dtype, shard)

    def hsdp_shard(self):
        """``apply_hsdp_to_model`` bound to this pipeline's mesh (built once, shared by
        Wan2.2's experts, rebuilt with the state's groups), or None without ``use_hsdp``."""
        config = HSDPInferenceConfig.from_parallel(self.state.config)
        if not config.enabled:
            return None
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

    # -- shared request validation (families call these from ``resolve``) ------
    multiple: int = 16
    """Width and height are rounded down to a multiple of this (latent patch x VAE)."""
    takes_layers: bool = False
    """Whether requests may set ``layers`` (layered decomposition models only)."""

    captions_empty_prompt: bool = False
    """Whether an empty prompt is allowed (Qwen-Image-Layered captions the image)."""

    def checked_steps(self, params: GenerationParams) -> int:
        """The rules every family shares, one per field (``ParamError`` naming it):
        prompt, ``num_inference_steps`` (None: the default; anything else must be a
        positive integer, so 0 is an error in every family), ``n``, the step cache
        (:class:`CacheConfig`) and ``layers``.
        Returns the step count."""
        if not isinstance(params.prompt, str) or (
            not params.prompt and not self.captions_empty_prompt
        ):
            raise ParamError("prompt", "prompt must be a non-empty string")
        steps = (
            self.default_steps if params.num_inference_steps is None else params.num_inference_steps
        )
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ParamError(
                "num_inference_steps",
                f"num_inference_steps ({steps!r}) must be a positive integer",
            )
        n = params.num_images
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ParamError("n", f"n ({n!r}) must be a positive integer")
        try:
            CacheConfig.from_dict(params.cache_backend, params.cache_config)
        except ValueError as exc:
            field = "cache_config" if params.cache_config else "cache_backend"
            raise ParamError(field, str(exc)) from None
        if params.layers is not None and not self.takes_layers:
            raise ParamError(
                "layers",
                f"layers is only for layered models (Qwen-Image-Layered); "
                f"{type(self).__name__} returns flat images",
            )
        return steps

    def rounded_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """Defaults filled in, then rounded down to ``multiple`` as diffusers does."""
        w = width if width is not None else self.default_width
        h = height if height is not None else self.default_height
        for name, value in (("width", w), ("height", h)):
            if not isinstance(value, int) or isinstance(value, bool) or value < self.multiple:
                raise ParamError(
                    "size",
                    f"{name} ({value!r}) must be an integer of at least {self.multiple} "
                    f"(sizes are rounded down to a multiple of {self.multiple})",
                )
        return w // self.multiple * self.multiple, h // self.multiple * self.multiple

    def make_cache(self, config: CacheConfig) -> StepCache:
        """Install a step cache on the transformer (families with other layouts override)."""
        adapter = self.cache_adapter()
        return build_cache(config, self.transformer, adapter, self.state, self.runtime)

    def cache_adapter(self) -> BlockCacheAdapter:
        """How this family's blocks look to a step cache."""
        raise ValueError(f"{type(self).__name__} does not support step caching")

    def fill_result(self, result: GenerationResult, request: Request, output) -> None:
        """Store one request's ``decode`` output (default: images) on its result."""
        result.images = output

    # -- the loop --------------------------------------------------------------
    @property
    def is_returning_rank(self) -> bool:
        return self.state.replica.rank == 0

    @property
    def decodes(self) -> bool:
        """Whether this rank takes part in the final decode: the returning rank and, with
        ``vae_patch_parallel_size`` > 1, the rest of its VAE group (they hold the VAE)."""
        return self.state.vae.ranks[0] == self.state.replica.ranks[0]

    def decode_chunks(self, job: Job, latents: torch.Tensor) -> tuple[list[torch.nn.Module], int]:
        """The modules whose forwards end one chunk of the final decode, and how many
        chunks there are (:mod:`ithaca.runtime.progress`): the image VAE's up-blocks."""
        return up_block_chunks(getattr(self, "vae", None))

    def final_decode(
        self, job: Job, latents: torch.Tensor, on_decode: DecodeCallback | None = None
    ):
        """``decode`` on every rank of the returning rank's VAE group, the VAE split by
        rows across them (exact: :mod:`ithaca.parallel.vae`); the output on the returning
        rank, None elsewhere. Previews decode on the returning rank alone. The returning
        rank reports the decode's start and each chunk through ``on_decode``."""
        if not self.decodes:
            return None
        report = on_decode if self.is_returning_rank else None
        ids = [r.params.request_id for r in job.requests]
        with (
            split_vae(getattr(self, "vae", None), self.state.vae),
            report_decode(self.decode_chunks(job, latents), ids, report, self.device),
        ):
            outputs = self.decode(job, latents)
        return outputs if self.is_returning_rank else None

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
            cache = self._cache_settings(r)
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
                outputs, meta = self._run_group(members, callback, on_decode)
                cancelled = bool(meta.get("cancelled"))
            for j, i in enumerate(indices):
                results[i].metadata.update(meta.get("per_request", [{}] * len(indices))[j])
                results[i].metadata["cancelled"] = bool(meta.get("cancelled"))
                if outputs is not None and self.is_returning_rank:
                    self.fill_result(results[i], requests[i], outputs[j])
        return results

    def _conditions(self, requests: list[Request]) -> list[dict[str, Any]]:
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

    def _cache_settings(self, request: Request) -> CacheConfig:
        """The request's step cache: its own, else the server's."""
        params = request.params
        if params.cache_backend is not None or params.cache_config:
            return CacheConfig.from_dict(params.cache_backend, params.cache_config)
        return self.cache_default

    def _install_cache(self, config: CacheConfig | None, lora: tuple = ()) -> StepCache | None:
        """The cache for ``config`` and the adapter set ``lora``, reinstalled only when
        either changes (each adapter set gets its own cache state). None: remove it."""
        key = None if config is None else (config, lora)
        if key != self._cache_key:
            if self._cache is not None:
                self._cache.remove()
            self._cache, self._cache_key = None, key
            if config is not None and config.backend:
                self._cache = self.make_cache(config)
        return self._cache

    def _cache_stats(self, cache: StepCache, do_cfg: bool, of: CacheStats | None = None) -> dict:
        # ``of``: one request's stats (a step batch), else the cache's whole run. On the
        # rank's device: NCCL takes no CPU tensors. After the loop: no per-step sync.
        of = cache.stats if of is None else of
        stats = [of.computed, of.cached]
        counts = torch.tensor(stats, dtype=torch.int64, device=self.device)
        if do_cfg and self.state.cfg.size > 1:  # each cfg rank saw one branch
            comm.all_reduce(counts, self.state.cfg)
        computed, cached = (int(c) for c in counts)
        total = computed + cached
        return {
            "backend": cache.name,
            "computed_steps": computed,
            "cached_steps": cached,
            "hit_ratio": round(cached / total, 4) if total else 0.0,
        }

    def _run_group(
        self,
        requests: list[Request],
        callback: StepCallback | None,
        on_decode: DecodeCallback | None = None,
    ):
        started = time.perf_counter()
        if self.loras is not None:  # every rank, before the group's first forward
            # Not fused when the transformer is offloaded: a merge into a device copy
            # would be dropped at eviction (the host buffer keeps the base weights).
            fuse = self.lora_fusable() and not self.offloading.transformer_on_host
            self.loras.apply(requests[0].lora, fuse=self.fuse_loras and fuse)
        cache = self._install_cache(self._cache_settings(requests[0]), requests[0].lora)
        conds = self._conditions(requests)
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
            stats = self._cache_stats(cache, requests[0].do_cfg)
            for m in per_request:
                m["cache"] = stats
        idle = idle_branch_warning(self.state, requests[0].do_cfg)  # per request: log, metadata
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
        outputs = self.final_decode(job, job.latents, on_decode)
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
