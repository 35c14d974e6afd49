"""User-facing configuration objects: defaulted, documented, validated.

Every invalid value raises ``ValueError`` naming the field and the numbers, so a
mistake on the command line or in Python reads the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be a positive integer")


ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "cudnn", "efficient", "sage")
PLACEMENTS = ("rank0", "offload")
"""Where a text encoder or VAE lives (``ParallelConfig.text_encoder_placement``)."""


@dataclass(frozen=True)
class ParallelConfig:
    """How one worker group splits a request across ranks.

    The world size is ``data_parallel_size * cfg_parallel_size * ring_degree *
    ulysses_degree * tensor_parallel_size``. Ranks are laid out with ``tp`` innermost
    (its all-reduce per layer is the heaviest traffic), then ``ulysses`` (adjacent
    ranks, so the all-to-all stays on NVLink neighbours), then ``ring``, then ``cfg``,
    with ``dp`` outermost; see ``ithaca.parallel.state`` for the rank map.
    """

    ulysses_degree: int = 1
    """Ranks that exchange attention heads by all-to-all (DeepSpeed Ulysses)."""

    ring_degree: int = 1
    """Ranks that rotate K/V blocks peer-to-peer (Ring attention)."""

    cfg_parallel_size: int = 1
    """1, or 2 to run the positive and negative guidance branches on separate ranks."""

    data_parallel_size: int = 1
    """Independent replicas, each running whole requests on its own ranks."""

    attention_backend: str = "auto"
    """Local attention kernel: ``auto`` picks the fastest installed one for what the
    layout needs (see ``ithaca.parallel.kernels``); ``sdpa``, ``flash`` (flash-attn 2/3),
    ``cudnn``, ``efficient`` or ``sage`` (SageAttention) ask for one, falling back with a
    warning where it cannot serve a call (no GPU, wrong architecture, a mask, a
    log-sum-exp it does not return)."""

    vae_patch_parallel_size: int = 1
    """Ranks of the replica that split the VAE decode (and encode) by latent rows, exactly:
    convolutions exchange halo rows, group norms all-reduce their statistics, attention
    gathers what it attends over (``ithaca.parallel.vae``). At most the replica's size
    ``cfg_parallel_size * ring_degree * ulysses_degree``; the first ranks of the replica
    decode, the others wait."""

    collective_timeout_s: float = 60.0
    """A collective that has not completed after this many seconds raises (a peer died
    or ran out of memory), instead of hanging the group."""

    tensor_parallel_size: int = 1
    """Ranks that split the transformer's weights: attention heads and MLP hidden units
    (column-parallel in, row-parallel out, one all-reduce each); see
    ``ithaca.parallel.tensor``. Heads are split by TP first, Ulysses splits the rest."""

    use_hsdp: bool = False
    """Shard the transformer's weights across ranks (PyTorch FSDP2 ``fully_shard``, one
    block at a time; see ``ithaca.parallel.hsdp``): each rank holds 1/``hsdp_shard_size``
    of them and all-gathers a block just before it runs."""

    hsdp_shard_size: int = -1
    """Ranks that share one copy of the weights (consecutive ranks of one replica, i.e.
    Ulysses neighbours first); -1: every rank of the replica
    (``cfg_parallel_size * ring_degree * ulysses_degree``)."""

    hsdp_replicate_size: int = 1
    """Copies of the weights within one replica; ``hsdp_replicate_size *
    hsdp_shard_size`` must equal the replica's rank count."""

    text_encoder_placement: str | None = None
    """Where the text encoders live (``ithaca.models.offload``): ``rank0`` (on the
    returning rank's device, the others hold none) or ``offload`` (on its host, on the
    device only while encoding). None: ``offload`` under ``cpu_offload``, else ``rank0``."""

    vae_placement: str | None = None
    """Where the VAE lives: ``rank0`` or ``offload``, as ``text_encoder_placement``."""

    cpu_offload: bool = False
    """``--enable-cpu-offload``: every large component (text encoders, VAE, and the
    transformer between requests) on the host, on the device only while it runs."""

    layerwise_offload: bool = False
    """``--enable-layerwise-offload``: the transformer's blocks on the host, streamed to
    the device one at a time (the next prefetched on a side stream on CUDA)."""

    def __post_init__(self) -> None:
        _require_positive("tensor_parallel_size", self.tensor_parallel_size)
        _require_positive("ulysses_degree", self.ulysses_degree)
        _require_positive("ring_degree", self.ring_degree)
        _require_positive("data_parallel_size", self.data_parallel_size)
        if self.cfg_parallel_size not in (1, 2):
            raise ValueError(f"cfg_parallel_size ({self.cfg_parallel_size!r}) must be 1 or 2")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend ({self.attention_backend!r}) must be one of "
                f"{ATTENTION_BACKENDS}"
            )
        _require_positive("vae_patch_parallel_size", self.vae_patch_parallel_size)
        replica = self.cfg_parallel_size * self.sequence_parallel_size * self.tensor_parallel_size
        if self.vae_patch_parallel_size > replica:
            raise ValueError(
                f"vae_patch_parallel_size ({self.vae_patch_parallel_size}) must be at most the "
                "replica's size cfg_parallel_size * ring_degree * ulysses_degree * "
                f"tensor_parallel_size ({replica})"
            )
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s ({self.collective_timeout_s}) must be > 0")
        if self.use_hsdp:
            self.hsdp_sizes()  # raises on sizes that do not tile a replica
            if self.tensor_parallel_size != 1:
                raise ValueError(
                    f"use_hsdp with tensor_parallel_size ({self.tensor_parallel_size}) is not "
                    f"supported yet: both split the weights; pick one"
                )
            if self.cpu_offload or self.layerwise_offload:
                raise ValueError(
                    f"use_hsdp with cpu_offload ({self.cpu_offload}) or layerwise_offload "
                    f"({self.layerwise_offload}) is not supported: the transformer is either "
                    f"sharded or offloaded (encoder placements combine with HSDP)"
                )
        for name in ("text_encoder_placement", "vae_placement"):
            value = getattr(self, name)
            if value not in (None, *PLACEMENTS):
                raise ValueError(f"{name} ({value!r}) must be one of {PLACEMENTS}")

    def placement(self, component: str) -> str:
        """``rank0`` or ``offload`` for ``text_encoder`` / ``vae`` (defaults resolved)."""
        given = getattr(self, f"{component}_placement")
        return given or ("offload" if self.cpu_offload else "rank0")

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return (
            self.data_parallel_size
            * self.cfg_parallel_size
            * self.sequence_parallel_size
            * self.tensor_parallel_size
        )

    @property
    def replica_size(self) -> int:
        """Ranks serving one request together (cfg x ring x ulysses)."""
        return self.cfg_parallel_size * self.sequence_parallel_size

    def hsdp_sizes(self) -> tuple[int, int]:
        """``(hsdp_replicate_size, hsdp_shard_size)`` with -1 resolved; ValueError if
        they do not tile one replica (HSDP shards only over ranks that run every forward
        together: a replica, never across data-parallel replicas)."""
        return hsdp_sizes(self.hsdp_replicate_size, self.hsdp_shard_size, self.replica_size)

    def validate_heads(self, num_heads: int) -> None:
        """Raise when Ulysses cannot split ``num_heads`` attention heads evenly (the
        heads of one tensor-parallel rank: the caller divides by ``tensor_parallel_size``)."""
        if num_heads % self.ulysses_degree:
            valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"ulysses_degree ({self.ulysses_degree}) must divide num_attention_heads "
                f"({num_heads}); valid degrees: {valid}"
            )

    @classmethod
    def auto(
        cls,
        world_size: int,
        model,
        size: tuple[int, int] = (1024, 1024),
        cfg: bool = False,
        interconnect: str | None = None,
    ) -> ParallelConfig:
        """The Ulysses / Ring / CFG / replica degrees the cost model of ``docs/guide.md``
        picks for ``world_size`` GPUs, ``model`` (checkpoint path, hub id or
        :class:`~ithaca.autolayout.ModelGeometry`), a ``(width, height)`` request
        ``size``, true CFG on or off, and ``"nvlink"`` / ``"pcie"`` (``None``: read from
        ``nvidia-smi topo -m``, else assume PCIe). Logs the choice and why; see
        :func:`ithaca.autolayout.plan` for the ranked candidates."""
        import logging

        from ithaca.autolayout import plan  # below config: it imports no ithaca module

        chosen = plan(world_size, model, size, cfg, interconnect)
        logging.getLogger(__name__).info("auto parallel layout: %s", chosen.reason)
        return cls(**chosen.degrees)


def hsdp_sizes(replicate: int, shard: int, replica: int) -> tuple[int, int]:
    """``(replicate, shard)`` for HSDP over ``replica`` ranks; shard -1: replica / replicate."""
    _require_positive("hsdp_replicate_size", replicate)
    if shard != -1:
        _require_positive("hsdp_shard_size", shard)
    where = (
        f"the ranks of one replica (cfg_parallel_size * ring_degree * ulysses_degree = {replica})"
    )
    if shard == -1:
        if replica % replicate:
            raise ValueError(f"hsdp_replicate_size ({replicate}) must divide {where}")
        shard = replica // replicate
    if replicate * shard != replica:
        raise ValueError(
            f"hsdp_replicate_size ({replicate}) * hsdp_shard_size ({shard}) must equal {where}"
        )
    if shard < 2:
        raise ValueError(
            f"hsdp_shard_size ({shard}) must be at least 2 to shard anything: HSDP splits the "
            f"weights over {where}; add --ulysses-degree / --ring-degree / --cfg-parallel-size"
        )
    return replicate, shard


# The reference system's name for the same object.
DiffusionParallelConfig = ParallelConfig


CACHE_OPTIONS: dict[str, frozenset[str]] = {
    "tea_cache": frozenset({"rel_l1_thresh", "coefficients"}),
    "cache_dit": frozenset(
        {
            "Fn_compute_blocks",
            "Bn_compute_blocks",
            "max_warmup_steps",
            "residual_diff_threshold",
            "max_cached_steps",
            "max_continuous_cached_steps",
            "enable_taylorseer",
            "taylorseer_order",
            "scm_steps_mask_policy",
            "scm_steps_policy",
        }
    ),
}
"""The step caches and the settings each takes (``ithaca.cache`` implements them)."""


def _frozen(value):
    """A JSON value made hashable (lists become tuples), so configs can key batches."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


@dataclass(frozen=True)
class CacheConfig:
    """Which step cache the pipeline uses and how it is tuned (per server or request).

    The one shape the cache settings take from the CLI (``--cache-backend``,
    ``--cache-config``) and the request (``cache_backend``, ``cache_config``) to the
    cache: validated here, once, and hashable, so it keys batches as it is.
    """

    backend: str | None = None
    """``None`` for no cache, else one of :data:`CACHE_OPTIONS` (``"tea_cache"``,
    ``"cache_dit"``)."""

    options: tuple[tuple[str, object], ...] = ()
    """Backend-specific settings as sorted key/value pairs (hashable); see :meth:`as_dict`."""

    def __post_init__(self) -> None:
        if self.backend is None:
            if self.options:
                raise ValueError(f"cache_config ({self.as_dict()!r}) given without a cache_backend")
            return
        if self.backend not in CACHE_OPTIONS:
            raise ValueError(
                f"cache_backend ({self.backend!r}) must be one of {sorted(CACHE_OPTIONS)}"
            )
        unknown = sorted({k for k, _ in self.options} - CACHE_OPTIONS[self.backend])
        if unknown:
            raise ValueError(
                f"cache_config has unknown keys {unknown} for {self.backend}; "
                f"valid keys: {sorted(CACHE_OPTIONS[self.backend])}"
            )

    @classmethod
    def from_dict(cls, backend: str | None, options: dict | None) -> CacheConfig:
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"cache_config ({options!r}) must be a JSON object")
        return cls(backend, tuple(sorted((k, _frozen(v)) for k, v in (options or {}).items())))

    def as_dict(self) -> dict:
        return dict(self.options)


ON_WORKER_FAILURE = ("restart", "exit")


@dataclass(frozen=True)
class ServerConfig:
    """The front process: HTTP, queueing, batching and worker-group supervision."""

    model: str | None = None
    """Checkpoint path or hub id; ``None`` serves the embedded default model."""

    served_model_name: str | None = None
    """Name clients pass as ``model``; defaults to ``model`` (or ``"ithaca-default"``)."""

    host: str = "127.0.0.1"
    """Interface to bind."""

    port: int = 8091
    """TCP port to bind (0 picks a free one)."""

    dtype: str | None = None
    """``bfloat16`` / ``float16`` / ``float32``; ``None`` lets the model decide."""

    api_key: str | None = None
    """When set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``."""

    max_queue_size: int = 64
    """Requests waiting beyond this get 429 with ``Retry-After``."""

    max_batch_size: int = 4
    """Images per forward pass when compatible requests are batched (1 disables batching)."""

    batch_wait_ms: float = 10.0
    """How long the oldest request waits for compatible company before it runs alone."""

    batch_invariant: bool = False
    """Give every request exactly its solo bytes: the requests of a batch run their own
    loops instead of sharing forward passes (fused batching, the default, keeps each image
    within 1/255 of its solo run at 2-3x the throughput)."""

    continuous_batching: bool = False
    """Step-level batching: compatible requests (same size and model settings) join a
    running batch at the next denoising step and leave at their last, instead of waiting
    for the whole batch. In process and on worker groups (rank 0 decides at each step
    boundary and broadcasts it); step caches keep per-request state, so a cached request
    joins a batch with the same cache settings; one with a LoRA or input images runs in a
    batch of its own."""

    compile: bool = False
    """Compile the transformer's repeated blocks (regional ``torch.compile``), warmed up
    at start-up for ``compile_sizes``; compiled artefacts are kept in the state
    directory's ``compile/`` so a restart does not compile again."""

    compile_sizes: tuple[tuple[int, int], ...] = ()
    """``(width, height)`` sizes the compiled blocks are warmed up for; empty: the
    model's default size. Other sizes compile on first use."""

    executor: str = "torchrun"
    """``torchrun`` (worker groups in subprocesses) or ``inprocess`` (one rank, no subprocess)."""

    on_worker_failure: str = "restart"
    """``restart`` the worker group or ``exit`` the server (non-zero) when a rank dies."""

    startup_timeout_s: float = 600.0
    """Every rank must load weights and report READY within this many seconds."""

    heartbeat_interval_s: float = 1.0
    """Idle worker groups prove liveness by a collective ping this often."""

    liveness_timeout_s: float = 10.0
    """No heartbeat (idle) for this long means the group is hung."""

    step_timeout_s: float = 300.0
    """No denoising step finished for this long while a batch runs means the group is hung."""

    drain_timeout_s: float = 30.0
    """After SIGTERM, running requests get this long to finish."""

    output_ttl_s: float = 3600.0
    """``response_format=url`` outputs are kept and served for this long."""

    max_body_bytes: int = 64 * 2**20
    """Request bodies above this many bytes get 413 (JSON and multipart alike)."""

    max_input_pixels: int = 4096 * 4096
    """An uploaded image whose header declares more pixels is refused (413, before decoding)."""

    max_output_pixels: int = 2048 * 2048
    """Largest requested output ``width * height`` (400, ``param`` = ``size``)."""

    max_steps: int = 200
    """Largest ``num_inference_steps`` a request may ask for."""

    max_n: int = 10
    """Largest ``n`` (images per request)."""

    max_frames: int = 241
    """Largest video ``num_frames`` (also bounds ``seconds * fps``)."""

    max_request_seconds: float = 1800.0
    """Admission: a request whose estimated run time (from measured step times) exceeds this
    is refused with 400 before it runs."""

    max_request_memory_gb: float | None = None
    """Admission: a request whose estimated peak memory per rank (from measured batches)
    exceeds this is refused with 400; ``None`` uses the memory the machine has free."""

    step_timeout_factor: float = 10.0
    """A step (or the decode after the last step) is declared hung after this many times
    its expected duration (and never before ``liveness_timeout_s``)."""

    checkpoint_every: int = 5
    """A running video job saves its latents and scheduler state every this many steps
    (in the state directory) and resumes from the last save after a restart."""

    video_ttl_s: float = 7 * 24 * 3600.0
    """Video jobs and their MP4 files expire this long after they complete (``expires_at``)."""

    state_dir: str | None = None
    """Video jobs (SQLite) and stored outputs live here; ``None`` uses ``~/.cache/ithaca``."""

    @staticmethod
    def compile_cache_dir(state_dir: str | None) -> str:
        """Where ``--compile`` keeps inductor's artefacts: ``compile/`` in the state dir."""
        return os.path.join(state_dir or os.path.expanduser("~/.cache/ithaca"), "compile")

    nnodes: int = 1
    """Nodes the worker group spans (torchrun static rendezvous)."""

    node_rank: int = 0
    """This node's index; the front runs on node 0, other nodes run ``ithaca worker-node``."""

    master_addr: str = "127.0.0.1"
    """Address of node 0 for the rendezvous."""

    master_port: int | None = None
    """Rendezvous port of the first worker group (``None`` picks a free one)."""

    loras: tuple[tuple[str, str, float], ...] = ()
    """LoRA adapters ``(name, path, scale)`` loaded at start (``--lora NAME=PATH[:SCALE]``)."""

    max_loras: int | None = None
    """At most this many adapters resident in the transformer (LRU; the rest are reloaded
    from their path when a request names them). None: no bound."""

    lora_dir: str | None = None
    """``POST /v1/loras`` loads files from inside this directory only; None: disabled."""

    lora_fuse: str = "never"
    """``"auto"``: merge an adapter set into the weights while a run of requests uses it
    (faster steps; images within 1/255 of unfused; the base weights restored bit for
    bit when the set changes); ``"never"``: adapters always run beside the base layers."""

    def __post_init__(self) -> None:
        _require_positive("max_queue_size", self.max_queue_size)
        _require_positive("max_batch_size", self.max_batch_size)
        _require_positive("nnodes", self.nnodes)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port ({self.port}) must be in 0..65535")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms ({self.batch_wait_ms}) must be >= 0")
        if self.executor not in ("torchrun", "inprocess"):
            raise ValueError(f"executor ({self.executor!r}) must be 'torchrun' or 'inprocess'")
        if self.continuous_batching and self.batch_invariant:
            raise ValueError("continuous_batching fuses requests; batch_invariant forbids it")
        if self.on_worker_failure not in ON_WORKER_FAILURE:
            raise ValueError(
                f"on_worker_failure ({self.on_worker_failure!r}) must be one of {ON_WORKER_FAILURE}"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank ({self.node_rank}) must be in 0..nnodes-1 ({self.nnodes})")
        if self.dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype ({self.dtype!r}) must be bfloat16, float16 or float32")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras ({self.max_loras}) must be >= 1")
        if self.lora_fuse not in ("auto", "never"):
            raise ValueError(f"lora_fuse ({self.lora_fuse!r}) must be 'auto' or 'never'")
        for width, height in self.compile_sizes:
            if width < 1 or height < 1:
                raise ValueError(f"compile_sizes ({width}x{height}) must be positive")
        names = [entry[0] for entry in self.loras]
        if len(set(names)) != len(names):
            raise ValueError(f"loras ({names}) name an adapter twice")
        for name in ("max_body_bytes", "max_input_pixels", "max_output_pixels", "max_steps"):
            _require_positive(name, getattr(self, name))
        _require_positive("max_n", self.max_n)
        _require_positive("checkpoint_every", self.checkpoint_every)
        _require_positive("max_frames", self.max_frames)
        if self.max_request_memory_gb is not None and self.max_request_memory_gb <= 0:
            raise ValueError(
                f"max_request_memory_gb ({self.max_request_memory_gb}) must be > 0 or None"
            )
        for name in (
            "heartbeat_interval_s",
            "liveness_timeout_s",
            "step_timeout_s",
            "max_request_seconds",
            "video_ttl_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")
        if self.step_timeout_factor < 2:
            raise ValueError(f"step_timeout_factor ({self.step_timeout_factor}) must be >= 2")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model or "ithaca-default"


def parse_lora_option(text: str) -> tuple[str, str, float]:
    """``NAME=PATH[:SCALE]`` (the ``--lora`` option) -> ``(name, path, scale)``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--lora {text!r} must be NAME=PATH[:SCALE]")
    path, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass  # a colon inside the path
    return name, path, scale
