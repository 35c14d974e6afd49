"""Manual sequence sharding across the sequence-parallel ranks of a state.

For code an ``_sp_plan`` cannot reach. Every function takes the
:class:`~ithaca.parallel.state.ParallelState` explicitly; ``sp_gather`` is collective.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ithaca.parallel import comm
from ithaca.parallel.state import ParallelState


def sp_shard(tensor: torch.Tensor, dim: int, state: ParallelState, validate: bool = True):
    """This rank's chunk of ``tensor`` along ``dim``.

    With ``validate`` the size must divide by the sequence-parallel size (else
    ``ValueError``); without it the chunks are as ``torch.chunk`` makes them.
    """
    axis = state.sp
    if axis.size == 1:
        return tensor
    if validate or tensor.shape[dim] % axis.size == 0:
        return comm.shard(tensor, axis, dim)
    chunks = tensor.chunk(axis.size, dim=dim)
    if axis.rank >= len(chunks):
        return tensor.narrow(dim, 0, 0)
    return chunks[axis.rank].contiguous()


def pad_to_multiple(tensor: torch.Tensor, dim: int, multiple: int, value: float = 0.0):
    """``(tensor padded at the end of dim to a multiple, amount of padding)``."""
    size = tensor.shape[dim]
    pad = (-size) % multiple
    if pad == 0:
        return tensor, 0
    dim = dim % tensor.dim()
    # F.pad lists (left, right) pairs from the last dimension backwards
    spec = [0, 0] * (tensor.dim() - 1 - dim) + [0, pad]
    if tensor.dtype == torch.bool:
        return F.pad(tensor.to(torch.uint8), spec, value=int(value)).bool(), pad
    return F.pad(tensor, spec, value=value), pad


def sp_shard_with_padding(
    tensor: torch.Tensor, dim: int, state: ParallelState, pad_value: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Pad ``dim`` to a multiple of the sequence-parallel size, then shard.

    Returns ``(shard, padding)``; trim ``padding`` positions after :func:`sp_gather`.
    Attention must mask the padded keys (``apply_sequence_parallel`` with
    ``auto_pad=True`` does this for you).
    """
    padded, pad = pad_to_multiple(tensor, dim, state.sp.size, pad_value)
    return sp_shard(padded, dim, state), pad


def sp_gather(tensor: torch.Tensor, dim: int, state: ParallelState, validate: bool = True):
    """Concatenate every sequence-parallel rank's shard along ``dim`` (collective)."""
    del validate  # shards of one tensor always have equal shapes here
    return comm.all_gather(tensor, state.sp, dim)


@dataclass
class ShardingValidator:
    """Tracks named shard and gather operations and checks that they pair up.

    ``validate()`` raises when a tensor was sharded and never gathered, or when a plan
    skipped a shard because of an unexpected shape (see ``record_skip``).
    """

    state: ParallelState | None = None
    _sharded: set[str] = field(default_factory=set)
    _gathered: set[str] = field(default_factory=set)
    _skipped: list[str] = field(default_factory=list)
    _enabled: bool = False

    @contextlib.contextmanager
    def track(self):
        """Enable tracking; clears what an earlier ``track()`` recorded."""
        self.reset()
        self._enabled = True
        try:
            yield self
        finally:
            self._enabled = False

    def reset(self) -> None:
        self._sharded.clear()
        self._gathered.clear()
        self._skipped.clear()

    def _state(self) -> ParallelState:
        if self.state is None:
            raise RuntimeError("ShardingValidator.shard/gather need a state")
        return self.state

    def shard(self, tensor, name: str, dim: int, validate_divisible: bool = True):
        out = sp_shard(tensor, dim, self._state(), validate=validate_divisible)
        self.record_shard(name)
        return out

    def gather(self, tensor, name: str, dim: int):
        out = sp_gather(tensor, dim, self._state())
        self.record_gather(name)
        return out

    def record_shard(self, name: str) -> None:
        if self._enabled:
            self._sharded.add(name)

    def record_gather(self, name: str) -> None:
        if self._enabled:
            self._gathered.add(name)

    def record_skip(self, description: str) -> None:
        if self._enabled:
            self._skipped.append(description)

    def validate(self) -> None:
        problems = []
        missing = sorted(self._sharded - self._gathered)
        if missing:
            problems.append(f"sharded but never gathered: {missing}")
        if self._skipped:
            problems.append(f"left unsharded because of unexpected shapes: {self._skipped}")
        if problems:
            raise ValueError("sequence-parallel sharding is inconsistent; " + "; ".join(problems))
