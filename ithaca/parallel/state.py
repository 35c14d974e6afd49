"""Process-group layout: one explicit object with named axes, built once per process.

Rank map. A world of ``dp * cfg * ring * ulysses * tp`` ranks is laid out with tensor
parallel (``tp``) innermost (its all-reduce per layer is the heaviest traffic), then
ulysses (its all-to-all stays between adjacent GPUs, i.e. on NVLink), then ring, then
cfg, with dp outermost::

    rank = (((dp_idx * cfg + cfg_idx) * ring + ring_idx) * ulysses + ulysses_idx) * tp + tp_idx

The example below has ``tp == 1``; with ``tp == 2`` every rank becomes two adjacent
ranks that hold the same sequence shard and half of its heads each (docs/parallel.md,
"Tensor parallel").

Example, 8 ranks with ulysses=2, ring=2, cfg=2 (dp=1)::

    rank  cfg  ring  ulysses   sp rank
      0    0    0      0          0      cfg branch 0 (positive prompt)
      1    0    0      1          1
      2    0    1      0          2
      3    0    1      1          3
      4    1    0      0          0      cfg branch 1 (negative prompt)
      5    1    0      1          1
      6    1    1      0          2
      7    1    1      1          3

    ulysses groups: [0,1] [2,3] [4,5] [6,7]
    ring groups:    [0,2] [1,3] [4,6] [5,7]
    sp groups:      [0,1,2,3] [4,5,6,7]     (sp rank = ring_idx * ulysses + ulysses_idx)
    cfg groups:     [0,4] [1,5] [2,6] [3,7]
    replica groups: [0..7]                  (all ranks serving one request)
    vae groups:     [0,1] [2,3] [4,5] [6,7] (vae_patch_parallel_size=2: consecutive
                                             replica ranks; the group of the replica's
                                             rank 0 splits the VAE decode by rows)

The sequence-parallel rank orders shards ring-major, so the ``ulysses`` ranks of one
ring position hold adjacent sequence shards: after the Ulysses all-to-all they hold
one contiguous segment, which is the block the ring rotates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ithaca.config import ParallelConfig

AXES = ("dp", "cfg", "ring", "ulysses", "tp")  # outermost -> innermost


@dataclass
class CommStats:
    """Bytes this rank sent, by collective kind (for benchmarks and tests)."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()


@dataclass(frozen=True)
class Axis:
    """One named group this rank belongs to."""

    name: str
    ranks: tuple[int, ...]
    """Global ranks of the group, in group-rank order."""
    rank: int
    """This process's index in ``ranks``."""
    group: dist.ProcessGroup | None
    """The process group; ``None`` when the axis has a single rank. Axes with the same
    members share one group (one communicator, not one per axis)."""
    stats: CommStats
    device: torch.device | None = None
    """Where this rank's collective tensors must live (``comm`` checks it)."""

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, index: int) -> int:
        return self.ranks[index % self.size]


def _rank(coords: dict[str, int], dims: dict[str, int]) -> int:
    rank = 0
    for name in AXES:
        rank = rank * dims[name] + coords[name]
    return rank


def _enumerate_groups(dims: dict[str, int], free: tuple[str, ...]) -> list[tuple[int, ...]]:
    """All groups whose members differ only along ``free`` axes (outer->inner order)."""
    fixed = [a for a in AXES if a not in free]
    groups = []
    for fixed_vals in itertools.product(*(range(dims[a]) for a in fixed)):
        coords = dict(zip(fixed, fixed_vals, strict=True))
        members = []
        for free_vals in itertools.product(*(range(dims[a]) for a in free)):
            coords.update(zip(free, free_vals, strict=True))
            members.append(_rank(coords, dims))
        groups.append(tuple(members))
    return groups


_FREE_AXES = {
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "sp": ("ring", "ulysses"),
    "cfg": ("cfg",),
    "tp": ("tp",),
    "replica": ("cfg", "ring", "ulysses", "tp"),
    "dp": ("dp",),
}


def layout_groups(config: ParallelConfig) -> dict[str, list[tuple[int, ...]]]:
    """Every group of every axis, as global ranks in group-rank order (the rank map)."""
    dims = {
        "dp": config.data_parallel_size,
        "cfg": config.cfg_parallel_size,
        "ring": config.ring_degree,
        "ulysses": config.ulysses_degree,
        "tp": config.tensor_parallel_size,
    }
    groups = {name: _enumerate_groups(dims, free) for name, free in _FREE_AXES.items()}
    # VAE patch parallel: consecutive chunks of each replica (the last may be smaller).
    v = config.vae_patch_parallel_size
    groups["vae"] = [r[i : i + v] for r in groups["replica"] for i in range(0, len(r), v)]
    return groups


class ParallelState:
    """Named process groups for the dp, cfg, ring, ulysses, tp, sp and replica axes.

    Built once per process with :meth:`from_env` (torchrun) or :meth:`build` (an
    already initialised default group), and passed explicitly to whatever needs it.
    Two states can live in one process (each owns its groups).
    """

    def __init__(
        self,
        config: ParallelConfig,
        rank: int,
        device: torch.device,
        axes: dict[str, Axis],
        cpu_group: dist.ProcessGroup | None,
        owned_groups: list[dist.ProcessGroup],
        stats: CommStats,
    ):
        self.config = config
        self.rank = rank
        self.world_size = config.world_size
        self.device = device
        self._set_axes(axes)
        self.cpu_group = cpu_group
        """Gloo group over the whole world, for CPU metadata (requests, decisions)."""
        self.stats = stats
        self._owned = owned_groups
        self._builders: list[tuple[Callable[[], list], Callable[[], None] | None]] = []
        """Who lays out more groups of this state (the HSDP mesh): see :meth:`add_groups`."""

    def _set_axes(self, axes: dict[str, Axis]) -> None:
        self.dp = axes["dp"]
        self.cfg = axes["cfg"]
        self.ring = axes["ring"]
        self.ulysses = axes["ulysses"]
        self.tp = axes["tp"]
        self.sp = axes["sp"]
        self.replica = axes["replica"]
        self.vae = axes["vae"]

    def __repr__(self) -> str:
        return (
            f"ParallelState(rank={self.rank}/{self.world_size}, dp={self.dp.rank}/{self.dp.size}, "
            f"cfg={self.cfg.rank}/{self.cfg.size}, ring={self.ring.rank}/{self.ring.size}, "
            f"ulysses={self.ulysses.rank}/{self.ulysses.size}, tp={self.tp.rank}/{self.tp.size}, "
            f"device={self.device})"
        )

    @classmethod
    def single(cls, config: ParallelConfig | None = None, device: str | torch.device = "cpu"):
        """A one-rank state that needs no process group."""
        config = config or ParallelConfig()
        if config.world_size != 1:
            raise ValueError(f"a single-process state needs world size 1, not {config.world_size}")
        stats = CommStats()
        device = torch.device(device)
        names = (*AXES, "sp", "replica", "vae")
        axes = {name: Axis(name, (0,), 0, None, stats, device) for name in names}
        return cls(config, 0, device, axes, None, [], stats)

    @classmethod
    def build(cls, config: ParallelConfig, device: str | torch.device | None = None):
        """Create every group of the layout. Collective: all ranks call it, in order."""
        if not dist.is_initialized():
            if config.world_size == 1:
                return cls.single(config, device or default_device())
            raise RuntimeError("torch.distributed is not initialised; use ParallelState.from_env")
        world = dist.get_world_size()
        if world != config.world_size:
            raise ValueError(
                f"world size ({world}) must equal data_parallel_size * cfg_parallel_size * "
                f"ring_degree * ulysses_degree * tensor_parallel_size ({config.world_size}) "
                f"for {config}"
            )
        rank = dist.get_rank()
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cuda":
            # Library users who start NCCL themselves: later allocations and NCCL's own
            # buffers must land on this rank's GPU, not on cuda:0 of every rank.
            torch.cuda.set_device(device)
        stats = CommStats()
        axes, owned = _create_groups(config, rank, device, stats)
        cpu_group = None
        if dist.get_backend() != "gloo":
            cpu_group = dist.new_group(backend="gloo", timeout=control_timeout(config))
            owned.append(cpu_group)
        return cls(config, rank, device, axes, cpu_group, owned, stats)

    def abort_groups(self) -> None:
        """Close this rank's axis groups at once (not the control group).

        A rank that gives up on a request mid-forward (an out-of-memory error) calls
        this so that peers blocked in a collective it will never reach are released:
        on gloo their pending operation fails as the connections close; on NCCL they
        wait for ``collective_timeout_s``. Follow with :meth:`rebuild_groups`.
        """
        for group in self._owned:
            if group is not self.cpu_group:
                with contextlib.suppress(Exception):  # a broken group may fail to close
                    dist.destroy_process_group(group)
        self._owned = [self.cpu_group] if self.cpu_group is not None else []
        # Drop every reference: a gloo group closes its connections (releasing peers)
        # only when it is freed. Until rebuild_groups no axis may be used.
        self._set_axes({name: _detached(axis) for name, axis in self._axes().items()})
        for _, release in self._builders:
            if release is not None:
                release()
        gc.collect()

    def _axes(self) -> dict[str, Axis]:
        return {name: getattr(self, name) for name in (*AXES, "sp", "replica", "vae")}

    def rebuild_groups(self) -> None:
        """Replace every axis group with a fresh one (after a failed collective).

        A rank that left a collective half-done (an error, an out-of-memory, a timeout)
        leaves its peers' groups out of step; new groups start clean. Collective: every
        rank calls it, in the same order. The control group (``cpu_group``, or the
        default group on gloo) is kept: it never carries model tensors.
        """
        self.abort_groups()
        axes, owned = _create_groups(self.config, self.rank, self.device, self.stats)
        self._set_axes(axes)
        self._owned = owned + self._owned
        for build, _ in self._builders:
            self._owned += build()

    def add_groups(
        self,
        build: Callable[[], list[dist.ProcessGroup]],
        release: Callable[[], None] | None = None,
    ) -> None:
        """Groups laid out outside this class (the HSDP mesh, ``ithaca.parallel.hsdp``):
        ``build()`` creates them now and again after every :meth:`rebuild_groups`, and
        returns them; :meth:`abort_groups` closes them like the axes' groups and calls
        ``release()``, which must drop every reference to them (a gloo group releases a
        blocked peer only when freed). Collective: every rank, in the same order."""
        self._builders.append((build, release))
        self._owned += build()

    def new_group(self, members: list[int]) -> dist.ProcessGroup:
        """A model group over ``members`` with the layout's collective timeout (collective:
        every rank calls it, members or not; the caller owns it, see :meth:`add_groups`)."""
        return dist.new_group(members, timeout=_timeout(self.config))

    @classmethod
    def from_env(cls, config: ParallelConfig, device: str | torch.device | None = None):
        """Initialise torch.distributed from the torchrun environment and build the groups.

        Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
        ``MASTER_PORT``. NCCL on CUDA (one device per local rank), gloo on CPU.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != config.world_size:
            raise ValueError(
                f"WORLD_SIZE ({world}) must equal the product of the parallel degrees "
                f"({config.world_size}) for {config}"
            )
        if world == 1 and "MASTER_ADDR" not in os.environ:
            return cls.single(config, device or default_device())
        device = torch.device(device) if device is not None else default_device()
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
                # No device_id: the default group's NCCL communicator is then created
                # lazily, i.e. never (model tensors use the state's groups, metadata
                # the gloo cpu_group), which saves one communicator's buffers per GPU.
                dist.init_process_group("nccl", timeout=control_timeout(config))
            else:  # the default group is the control group on gloo
                dist.init_process_group("gloo", timeout=control_timeout(config))
        return cls.build(config, device)

    def destroy(self) -> None:
        """Release the groups this state created (not the default group)."""
        for group in self._owned:
            dist.destroy_process_group(group)
        self._owned = []


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _timeout(config: ParallelConfig) -> timedelta:
    return timedelta(seconds=config.collective_timeout_s)


def control_timeout(config: ParallelConfig) -> timedelta:
    """Timeout of the control group (metadata, failure agreement): longer than a model
    collective's, so that ranks released by a model-group timeout still find their
    peers waiting to agree on the failure."""
    return timedelta(seconds=2 * config.collective_timeout_s + 30)


def _detached(axis: Axis) -> Axis:
    """``axis`` without its (closed) group; a multi-rank detached axis must not be used."""
    return dataclasses.replace(axis, group=None) if axis.size > 1 else axis


def _create_groups(
    config: ParallelConfig, rank: int, device: torch.device, stats: CommStats
) -> tuple[dict[str, Axis], list[dist.ProcessGroup]]:
    """One process group per distinct member list of the layout, shared by the axes.

    With ulysses 8 on 8 GPUs the ulysses, sp and replica axes all have members
    ``0..7``: one communicator serves them (each costs NCCL buffers on every GPU).
    Collective: every rank creates every group in the same order (``new_group`` is
    collective even for ranks outside the group).
    """
    by_members: dict[tuple[int, ...], dist.ProcessGroup] = {}
    axes: dict[str, Axis] = {}
    for name, groups in layout_groups(config).items():
        for members in groups:
            group = None
            if len(members) > 1:
                group = by_members.get(members)
                if group is None:
                    group = by_members[members] = dist.new_group(
                        list(members), timeout=_timeout(config)
                    )
            if rank in members:
                axes[name] = Axis(name, members, members.index(rank), group, stats, device)
    return axes, list(by_members.values())
