"""HSDP for inference: the transformer's weights sharded with PyTorch FSDP2 ``fully_shard``.

Sequence parallelism splits activations, not weights: without this every rank holds
the whole transformer. With HSDP each rank keeps ``1/shard`` of every parameter (rows
of dim 0, a DTensor ``Shard(0)``) and, for each block in turn, all-gathers the block's
weights just before it runs and frees them right after (``reshard_after_forward``).

The mesh. HSDP may shard only over ranks that run every forward of a request
together, i.e. inside one replica (cfg x ring x ulysses; data-parallel replicas run
different requests). The world is laid out as a 2-D :class:`DeviceMesh`
``(replicate, shard)`` of shape ``(dp * hsdp_replicate_size, hsdp_shard_size)`` in the
layout's own rank order, so a shard group is ``hsdp_shard_size`` consecutive ranks of
one replica (Ulysses neighbours first, the NVLink-near GPUs)::

    8 ranks, ulysses 4, cfg 2, hsdp_shard_size -1 (= 8):   shard [0..7]
    8 ranks, ulysses 4, cfg 2, hsdp_replicate_size 2:      shard [0..3] [4..7]
    8 ranks, ulysses 2, dp 2, hsdp_shard_size -1 (= 4):    shard [0..3] [4..7]

Inference has no gradients, so nothing is ever reduced over the replicate dimension:
it only says which ranks hold the same shard.

The sharding unit is a block: every element of each top-level ``nn.ModuleList`` of
the transformer (the block lists a family's spec names - ``transformer_blocks``,
``single_transformer_blocks``, ``blocks``, ``layers`` - plus refiners such as
Z-Image's) gets its own ``fully_shard``; the root collects the rest (embedders,
norms, projections). A model whose pipeline never calls its root ``forward`` (Bagel)
declares its units instead (``_hsdp_units``, :func:`declared_units`), each its own root.
Prefetch: FSDP2's implicit forward prefetching. On a GPU the
all-gathers run on their own stream, so block ``i+1``'s all-gather is issued as soon as
the CPU reaches it - while the GPU still computes block ``i`` - and no explicit
``set_modules_to_forward_prefetch`` order is needed. That also keeps it correct when a
step cache skips blocks (an explicit prefetch of a block that then does not run would
hold its gathered weights). On CPU/gloo collectives are synchronous: no overlap.

Everything a step cache, Ulysses or Ring does happens inside a block's forward (their
hooks wrap ``block.forward``; FSDP's hooks wrap ``block.__call__``), so they see whole
weights. Every rank of a shard group calls the same blocks in the same order (the
cache decisions are agreed across the replica), as FSDP's all-gathers need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ithaca.config import ParallelConfig, hsdp_sizes
from ithaca.parallel.state import ParallelState

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MESH_DIMS = ("replicate", "shard")


def _dtype(name: str, value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"{name} ({value!r}) must be None or one of {sorted(_DTYPES)}")
    return _DTYPES[value]


@dataclass(frozen=True)
class HSDPInferenceConfig:
    """How the transformer's weights are sharded (the reference system's names)."""

    enabled: bool = False
    """Shard the weights; False: :func:`apply_hsdp_to_model` leaves the model alone."""
    hsdp_replicate_size: int = 1
    """Copies of the weights per replica."""
    hsdp_shard_size: int = -1
    """Ranks one copy is split over; -1: all ranks of the replica / ``hsdp_replicate_size``."""
    param_dtype: torch.dtype | str | None = None
    """dtype the weights are all-gathered and computed in (None: as loaded)."""
    reduce_dtype: torch.dtype | str | None = None
    """dtype of gradient reductions (unused by inference; kept for the reference's API)."""
    output_dtype: torch.dtype | str | None = None
    """dtype each sharded module's outputs are cast to (None: as computed)."""
    reshard_after_forward: bool = True
    """Free each block's gathered weights after it ran (False keeps them: the whole
    model resident after the first step, less communication, no memory saving)."""

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype", "output_dtype"):
            object.__setattr__(self, name, _dtype(name, getattr(self, name)))
        if self.hsdp_replicate_size < 1 or isinstance(self.hsdp_replicate_size, bool):
            raise ValueError(f"hsdp_replicate_size ({self.hsdp_replicate_size}) must be >= 1")
        if self.hsdp_shard_size != -1 and self.hsdp_shard_size < 1:
            raise ValueError(f"hsdp_shard_size ({self.hsdp_shard_size}) must be -1 or >= 1")

    @classmethod
    def from_parallel(cls, config: ParallelConfig, **kwargs) -> HSDPInferenceConfig:
        """The HSDP settings of a layout (``use_hsdp`` and the two sizes)."""
        return cls(
            enabled=config.use_hsdp,
            hsdp_replicate_size=config.hsdp_replicate_size,
            hsdp_shard_size=config.hsdp_shard_size,
            **kwargs,
        )

    def sizes(self, replica_size: int) -> tuple[int, int]:
        """``(replicate, shard)`` over a replica of ``replica_size`` ranks (ValueError if
        they do not tile it)."""
        return hsdp_sizes(self.hsdp_replicate_size, self.hsdp_shard_size, replica_size)


def hsdp_mesh(config: HSDPInferenceConfig) -> DeviceMesh:
    """The ``(replicate, shard)`` mesh over the default group, one replica
    (``init_device_mesh``). A layout's mesh, built from groups its state owns and rebuilt
    with them, is :class:`HSDPMesh`'s. Collective: every rank of the world calls it (it
    creates the mesh's process groups).
    """
    world = dist.get_world_size()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, shard = config.sizes(world)
    return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=MESH_DIMS)


class HSDPMesh:
    """A layout's HSDP mesh built from groups its :class:`ParallelState` owns, and the
    models sharded over it (:meth:`shard`).

    After a failed collective the worker loop calls ``state.rebuild_groups()``: the old
    groups are closed (a peer blocked in a block's all-gather is released) and this
    builds a fresh mesh of the same shape and points every sharded module at it
    (:func:`rebind_mesh`), so the next request all-gathers over groups that start clean.
    """

    def __init__(self, config: HSDPInferenceConfig, state: ParallelState):
        self.config, self.state = config, state
        _, self.shard_size = config.sizes(state.replica.size)
        self.mesh: DeviceMesh | None = None
        self.models: list[nn.Module] = []
        self.builds = 0
        """How many meshes were built (1 + rebuilds; what the tests check)."""
        state.add_groups(self._build, self._release)

    def _build(self) -> list[dist.ProcessGroup]:
        # (world,) -> (world / shard, shard): a row is one shard group (consecutive
        # ranks of one replica), a column the ranks holding the same rows.
        # new_group is collective: every rank creates every group, in this order.
        world, shard, rank = self.state.world_size, self.shard_size, self.state.rank
        grid = torch.arange(world).view(world // shard, shard)
        owned, mine = [], {}
        for dim, lines in enumerate((grid.t(), grid)):  # replicate: columns; shard: rows
            for line in lines.tolist():
                group = self.state.new_group(line)
                owned.append(group)
                if rank in line:
                    mine[dim] = group
        mesh = DeviceMesh.from_group(
            [mine[0], mine[1]], self.state.device.type, grid, mesh_dim_names=MESH_DIMS
        )
        members = mesh["shard"].mesh.flatten().tolist()  # inside this rank's replica
        assert set(members) <= set(self.state.replica.ranks), (members, self.state.replica)
        self.mesh = mesh
        self.builds += 1
        for model in self.models:
            reset_after_failure(model)
            rebind_mesh(model, mesh)
        return owned

    def _release(self) -> None:
        """Drop every reference to the closed groups (the mesh's registry, the process
        groups FSDP's mesh infos keep), until :meth:`_build` makes new ones."""
        if self.mesh is not None:
            self.mesh._pg_registry.clear()
        for model in self.models:
            for group in _param_groups(model):
                for info in {id(i): i for i in _infos(group)}.values():
                    info.shard_process_group = info.reduce_scatter_process_group = None
                    if hasattr(info, "replicate_process_group"):
                        info.replicate_process_group = None

    def shard(self, model: nn.Module) -> nn.Module:
        """:func:`apply_hsdp_to_model` over this mesh; ``model`` follows its rebuilds."""
        apply_hsdp_to_model(model, self.config, mesh=self.mesh)
        if self.config.enabled:
            self.models.append(model)
        return model


def block_lists(model: nn.Module) -> list[str]:
    """Names of the model's top-level ``nn.ModuleList`` s: its block stacks."""
    return [name for name, child in model.named_children() if isinstance(child, nn.ModuleList)]


def declared_units(model: nn.Module) -> list[nn.Module] | None:
    """The sharding units a model declares in ``_hsdp_units`` (None: it declares none).

    A model whose pipeline never calls its root ``forward`` (Bagel: the decoder layers,
    the embedders and the ViT are called one by one, around KV caches) cannot use the
    root as the unit that gathers the leftover parameters. It lists, as dotted paths, the
    modules its pipeline calls directly (a ``ModuleList`` stands for each element); each
    becomes its own ``fully_shard`` root, so each must be called through ``__call__`` and
    no unit may contain another. ValueError if a parameter is left out of every unit
    (it would stay whole on every rank)."""
    paths = getattr(model, "_hsdp_units", None)
    if paths is None:
        return None
    units: list[nn.Module] = []
    for path in paths:
        module = model.get_submodule(path)
        units += list(module) if isinstance(module, nn.ModuleList) else [module]
    owner: dict[int, int] = {}
    for index, unit in enumerate(units):
        for param in unit.parameters():
            assert id(param) not in owner, f"{type(model).__name__}: units overlap at {index}"
            owner[id(param)] = index
    left = [name for name, param in model.named_parameters() if id(param) not in owner]
    if left:
        raise ValueError(
            f"{type(model).__name__}._hsdp_units leaves {len(left)} parameter(s) unsharded, "
            f"e.g. {left[:3]}: add the module that holds them"
        )
    return units


def apply_hsdp_to_model(
    model: nn.Module,
    config: HSDPInferenceConfig,
    *,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Shard ``model`` in place: each block of :func:`block_lists`, then the root (or,
    if the model declares them, only its :func:`declared_units`).

    Works on a model built on the ``meta`` device (nothing is allocated: the sharded
    parameters are meta DTensors, see :func:`ithaca.runtime.loading.load_streamed`) or
    on a loaded one (each rank keeps its rows, the rest is freed). Without ``mesh`` the
    default group is one replica; a layout's model goes through :meth:`HSDPMesh.shard`,
    which passes its mesh and makes the model follow group rebuilds. Collective over the
    mesh.
    """
    if not config.enabled:
        return model
    mesh = mesh if mesh is not None else hsdp_mesh(config)
    policy = MixedPrecisionPolicy(
        param_dtype=config.param_dtype,
        reduce_dtype=config.reduce_dtype,
        output_dtype=config.output_dtype,
    )
    kwargs = dict(mesh=mesh, reshard_after_forward=config.reshard_after_forward, mp_policy=policy)
    units = declared_units(model)
    if units is not None:  # each its own root; the model's forward is never the entry
        for unit in units:
            fully_shard(unit, **kwargs)
        return model
    for name in block_lists(model):
        for block in getattr(model, name):
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _param_groups(model: nn.Module):
    """FSDP2's parameter groups of every sharded module of ``model``."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            yield from module._get_fsdp_state()._fsdp_param_groups


def _infos(group) -> list:
    """The mesh infos of one parameter group and its parameters (shared objects)."""
    out = [group.mesh_info, group.post_forward_mesh_info]
    for param in group.fsdp_params:
        out += [param.mesh_info, param.post_forward_mesh_info]
    return [info for info in out if info is not None]


def reset_after_failure(model: nn.Module) -> None:
    """A sharded ``model`` (the root :func:`apply_hsdp_to_model` was given) whose forward
    raised, back to its state between forwards: every block resharded (a block whose
    weights stayed gathered would skip the next all-gather its peers make), the
    iteration's trackers cleared. The failed all-gathers' work belongs to closed groups:
    dropped, not waited on. No collective."""
    for group in _param_groups(model):
        group._all_gather_result = None
    for root in _roots(model):
        root._get_fsdp_state()._comm_ctx.all_gather_state = None
        root.reset_iter_state()


def _roots(model: nn.Module) -> list[FSDPModule]:
    """The sharded modules of ``model`` inside no other one: ``model`` itself, or each of
    its :func:`declared_units`."""
    if isinstance(model, FSDPModule):
        return [model]
    return [m for m in (declared_units(model) or []) if isinstance(m, FSDPModule)]


def rebind_mesh(model: nn.Module, mesh: DeviceMesh) -> None:
    """Point every module of ``model`` sharded by :func:`apply_hsdp_to_model` at ``mesh``
    (the same shape as the one it was sharded over, e.g. rebuilt after a failure).

    FSDP2 keeps the mesh in each parameter group's mesh info (whose process group the
    all-gathers use), in each parameter's info and sharding spec, and in the sharded
    DTensor parameter; the local shards themselves stay where they are.
    """
    infos: dict[int, object] = {}

    def remesh(info):
        if info is None:
            return None
        if id(info) not in infos:  # shared infos stay shared
            infos[id(info)] = dataclasses.replace(info, mesh=mesh)  # new process groups
        return infos[id(info)]

    for group in _param_groups(model):
        group.mesh_info = remesh(group.mesh_info)
        group.post_forward_mesh_info = remesh(group.post_forward_mesh_info)
        for param in group.fsdp_params:
            assert tuple(param.mesh_info.mesh.shape) == tuple(mesh.shape), mesh
            param.mesh_info = remesh(param.mesh_info)
            param.post_forward_mesh_info = remesh(param.post_forward_mesh_info)
            param._shard_mesh = param._init_shard_mesh()
            param._sharding_spec = dataclasses.replace(param._sharding_spec, mesh=mesh)
            param.sharded_param._spec = param._sharding_spec


def _shard_mesh(target) -> tuple[int, int] | None:
    """``(shard size, shard rank)`` of a sharded module or a layout; None if unsharded."""
    if isinstance(target, ParallelState):
        if not target.config.use_hsdp:
            return None
        _, shard = target.config.hsdp_sizes()
        return shard, target.replica.rank % shard
    for param in target.parameters():
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            dim = mesh.mesh_dim_names.index("shard") if mesh.mesh_dim_names else mesh.ndim - 1
            return mesh.size(dim), _coordinate(mesh, dim)
    return None


def _coordinate(mesh: DeviceMesh, dim: int) -> int:
    """This rank's index along ``dim`` of ``mesh``, from the mesh's layout (no process
    group: valid after the state's groups were closed)."""
    return mesh.get_coordinate()[dim]


def get_fully_shard_world_size(target: nn.Module | ParallelState) -> int:
    """Ranks one copy of the weights is split over (1: not sharded), of a module
    sharded by :func:`apply_hsdp_to_model` or of a layout."""
    found = _shard_mesh(target)
    return found[0] if found else 1


def get_fully_shard_rank(target: nn.Module | ParallelState) -> int:
    """This rank's index in its shard group (0: not sharded)."""
    found = _shard_mesh(target)
    return found[1] if found else 0


def parameter_bytes(modules: nn.Module | Iterable[nn.Module | None]) -> int:
    """Bytes of the parameters of ``modules`` (one module or several; ``None`` skipped)
    held by this rank, each parameter once: a DTensor counts its local shard only (what
    ``/metrics`` reports per rank; read between forwards)."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    seen: set[int] = set()
    total = 0
    for module in modules:
        if not isinstance(module, nn.Module):
            continue
        for param in module.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            local = param.to_local() if isinstance(param, DTensor) else param
            total += local.numel() * local.element_size()
    return total


def local_rows(param: DTensor) -> tuple[int, int, int] | None:
    """``(dim, start, length)`` of the global tensor this rank's shard holds; None if
    it holds all of it. FSDP2 splits like ``torch.chunk``: ``ceil(n / shards)`` rows per
    rank, the last ranks fewer or none."""
    sharded = [(i, p.dim) for i, p in enumerate(param.placements) if p.is_shard()]
    if not sharded:
        return None
    assert len(sharded) == 1, param.placements
    mesh_dim, dim = sharded[0]
    n, rank = param.device_mesh.size(mesh_dim), _coordinate(param.device_mesh, mesh_dim)
    size = param.shape[dim]
    chunk = -(-size // n)
    start = min(rank * chunk, size)
    length = param.to_local().shape[dim]
    assert length == max(0, min(chunk, size - start)), (param.shape, length, rank, n)
    return dim, start, length
