"""Manual sequence sharding across the sequence-parallel ranks, for code a plan cannot reach.

Two ways to name the ranks:

- explicitly: ``sp_shard(x, 1, state)`` with a
  :class:`~ithaca.parallel.state.ParallelState` (what ithaca's own code does);
- ambiently, as the reference API documents it: ``sp_shard(x, dim=1)``. The state is
  then the one of the parallelized forward that is running (the ``_sp_plan`` runtime
  sets it for the duration of the root module's forward), else the one attached by
  ``SequenceParallelConfig.setup``; with neither (one process, no process group) the
  helpers are identities.

``sp_gather`` is collective over the sequence-parallel group: every rank calls it, in
the same order.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ithaca.parallel import comm
from ithaca.parallel.state import ParallelState

# The state of the parallelized forward running in this thread/context (set and reset by
# SequenceParallelRuntime around the root module's forward).
_FORWARD_STATE: contextvars.ContextVar[ParallelState | None] = contextvars.ContextVar(
    "ithaca_forward_state", default=None
)
# The state attached by SequenceParallelConfig.setup (process-wide fallback).
_SETUP_STATE: list[ParallelState | None] = [None]


def current_state() -> ParallelState | None:
    """The ambient state: the running forward's, else ``setup``'s, else ``None``."""
    state = _FORWARD_STATE.get()
    return state if state is not None else _SETUP_STATE[0]


def set_setup_state(state: ParallelState | None) -> None:
    """Make ``state`` the fallback ambient state (``SequenceParallelConfig.setup``)."""
    _SETUP_STATE[0] = state


def enter_forward(state: ParallelState) -> contextvars.Token:
    """Make ``state`` ambient until :func:`leave_forward` with the returned token."""
    return _FORWARD_STATE.set(state)


def leave_forward(token: contextvars.Token) -> None:
    _FORWARD_STATE.reset(token)


@contextlib.contextmanager
def ambient_state(state: ParallelState):
    """``with ambient_state(state):`` the documented helpers use ``state``."""
    token = enter_forward(state)
    try:
        yield state
    finally:
        leave_forward(token)


def _resolve(state) -> ParallelState | None:
    return state if state is not None else current_state()


def _split_args(state, flag, default):
    """Accept both ``f(x, dim, state, flag)`` and the documented ``f(x, dim, flag)``."""
    if state is not None and not isinstance(state, ParallelState):
        return None, state  # the third positional argument was the flag
    return state, (default if flag is None else flag)


def sp_shard(
    tensor: torch.Tensor,
    dim: int,
    state: ParallelState | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """This rank's chunk of ``tensor`` along ``dim``.

    With ``validate`` (default) the size must divide by the sequence-parallel size (else
    ``ValueError``). Without it the chunks are as ``torch.tensor_split`` makes them
    (sizes differ by at most one); :func:`sp_gather` reassembles such shards exactly.
    """
    state, validate = _split_args(state, validate, True)
    state = _resolve(state)
    if state is None or state.sp.size == 1:
        return tensor
    axis = state.sp
    if validate or tensor.shape[dim] % axis.size == 0:
        return comm.shard(tensor, axis, dim)
    return tensor.tensor_split(axis.size, dim=dim)[axis.rank].contiguous()


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
    tensor: torch.Tensor,
    dim: int,
    state: ParallelState | None = None,
    pad_value: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Pad ``dim`` to a multiple of the sequence-parallel size, then shard.

    Returns ``(shard, padding)``; trim ``padding`` positions after :func:`sp_gather`.
    Attention must mask the padded keys (``apply_sequence_parallel`` with
    ``auto_pad=True`` does this for you). Identity ``(tensor, 0)`` without a state.
    """
    state, pad_value = _split_args(state, pad_value, 0.0)
    state = _resolve(state)
    if state is None or state.sp.size == 1:
        return tensor, 0
    padded, pad = pad_to_multiple(tensor, dim, state.sp.size, pad_value)
    return sp_shard(padded, dim, state), pad


def sp_gather(
    tensor: torch.Tensor,
    dim: int,
    state: ParallelState | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Concatenate every sequence-parallel rank's shard along ``dim`` (collective).

    With ``validate`` (default) the ranks first exchange their shard lengths, so shards
    of unequal length (``sp_shard(..., validate=False)``) are padded to the longest for
    the all-gather and trimmed after it: an all-gather of unequal tensors would hang on
    NCCL. ``validate=False`` skips that exchange and requires equal shards.
    """
    state, validate = _split_args(state, validate, True)
    state = _resolve(state)
    if state is None or state.sp.size == 1:
        return tensor
    axis = state.sp
    if not validate:
        return comm.all_gather(tensor, axis, dim)
    dim = dim % tensor.dim()
    # (1,) per rank -> (P,): every rank's shard length, created on the rank's device
    local = torch.tensor([tensor.shape[dim]], dtype=torch.int64, device=tensor.device)
    lengths = comm.all_gather(local, axis, 0).tolist()  # host sync: outside any step loop
    longest = max(lengths)
    if min(lengths) == longest:
        return comm.all_gather(tensor, axis, dim)
    # (.., L_r, ..) -> (.., L_max, ..) on every rank -> (.., P * L_max, ..) -> trimmed pieces
    padded = pad_to_multiple(tensor, dim, longest)[0] if tensor.shape[dim] else None
    if padded is None:  # an empty shard: pad from zero length
        shape = list(tensor.shape)
        shape[dim] = longest
        padded = tensor.new_zeros(shape)
    full = comm.all_gather(padded, axis, dim)
    pieces = full.split(longest, dim=dim)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, lengths, strict=True)], dim=dim)


@dataclass
class ShardingValidator:
    """Tracks named shard and gather operations and checks that they pair up.

    ``validate()`` raises when a tensor was sharded and never gathered, or when a plan
    skipped a shard because of an unexpected shape (see ``record_skip``). Without a
    ``state`` it shards over the ambient state (identity in a single process).
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

    def shard(self, tensor, name: str, dim: int, validate_divisible: bool = True):
        out = sp_shard(tensor, dim, self.state, validate=validate_divisible)
        self.record_shard(name)
        return out

    def gather(self, tensor, name: str, dim: int):
        out = sp_gather(tensor, dim, self.state)
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


_DEFAULT_VALIDATOR = ShardingValidator()


def get_sharding_validator() -> ShardingValidator:
    """The process's default validator; it shards over the ambient state."""
    return _DEFAULT_VALIDATOR
