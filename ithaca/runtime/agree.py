"""The returning rank's decisions and data, agreed by every rank of its replica.

Only the returning rank (the replica's rank 0) hears the engine and holds the encoders:
it conditions the requests (:func:`from_returning_rank`), its step callback may cancel
(:class:`StopFlag`), its queue hands over requests that join a step batch
(:func:`agree_boundary`). Every rank must stop and
join at the same step (they make the same collective calls in the same order), so each
decision is broadcast over the replica as a small tensor on the rank's device (NCCL
takes no CPU tensors), and read back on the host where it costs least.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ithaca.parallel import ParallelState, comm

logger = logging.getLogger(__name__)
_FAILED = "ithaca.runtime.agree: rank 0 failed"


def from_returning_rank(state: ParallelState, produce: Callable[[], Any], follow=None) -> Any:
    """``produce()`` on the replica's rank 0, its result on every rank of the replica.

    The other ranks run ``follow()`` meanwhile (their part of rank 0's work: its VAE
    group's split encode) and wait in one packed broadcast (``comm.broadcast_nested``:
    the embeddings stay on the device), which every rank reaches once per call, in call
    order. A failure on rank 0 is sent in that broadcast, so no rank waits forever: rank
    0 raises its exception, the others a ``ValueError`` for a user error, else a
    ``RuntimeError``, naming it.
    """
    replica = state.replica
    result, failure = None, None
    if replica.rank == 0:
        try:
            result = produce()
        except Exception as exc:
            if replica.size == 1:
                raise
            logger.exception("the returning rank failed")
            failure = exc
            result = (_FAILED, type(exc).__name__, f"conditioning failed on rank 0: {exc}")
    elif follow is not None:
        follow()
    if replica.size == 1:
        return result
    result = comm.broadcast_nested(result, replica)
    if failure is not None:
        raise failure
    if isinstance(result, tuple) and result[:1] == (_FAILED,):
        _, kind, message = result
        raise (ValueError if kind == "ValueError" else RuntimeError)(message)
    return result


class StopFlag:
    """The returning rank's cancel decision, the same on every rank of the replica.

    On one rank the decision is the callback's, at once. On several, the flag of step
    ``i`` is broadcast, copied to the host behind it and read only after step ``i + 1``
    has been queued: the host then waits for that copy, never for the step's kernels.
    So the replica stops one step after the callback asked (at the last step: at once).
    """

    def __init__(self, state: ParallelState, device: torch.device):
        self.replica = state.replica
        self.device = device
        self.pending: _HostCopy | None = None

    def agreed(self, asked: bool, last: bool) -> bool:
        if self.replica.size == 1:
            return asked
        # a fill on the device, not a host-to-device copy (which would wait for the stream)
        flag = torch.full((1,), int(asked), dtype=torch.int32, device=self.device)
        # Every rank reaches this broadcast once per step, so all agree on the same step.
        comm.broadcast(flag, self.replica)
        previous, self.pending = self.pending, _HostCopy(flag)
        if last:  # nothing left to overlap with: this step's flag decides
            return self.pending.read()
        return previous is not None and previous.read()


class _HostCopy:
    """A small device tensor copied to pinned host memory without blocking the host."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        self.value = tensor
        if tensor.device.type == "cuda":
            self.value = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.value.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # waits for the copy, queued before the next step
        return bool(self.value[0])


def agree_boundary(state: ParallelState, cancel: bool, joiners: list) -> tuple[bool, list]:
    """A step batch's boundary decision ``(cancel, joiners)``, rank 0's on every rank.

    Every rank of the replica reaches both broadcasts once per step boundary, in this
    order: ``(2,)`` ``[cancel, number of joiners]`` (read back with one ``tolist()``: the
    boundary's one host sync, after the step's last kernel), then the joiners' parameters
    (prompts: host data, a pickle) only when some join.
    """
    replica = state.replica
    if replica.size == 1:
        return cancel, joiners
    flags = torch.tensor([int(cancel), len(joiners)], device=state.device)
    cancel, count = comm.broadcast(flags, replica).tolist()
    if count:
        joiners = comm.broadcast_object(joiners, replica)
    return bool(cancel), joiners
