"""Collectives over one :class:`~ithaca.parallel.state.Axis`, with shapes and byte counts.

Every function here is collective over its axis: every rank of the axis must call it,
in the same order, with tensors of the same shape. Bytes counted are the bytes this
rank puts on the wire (its own chunk of an all-to-all stays local and is not counted).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ithaca.parallel.state import Axis


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_device(call: str, axis: Axis, *tensors: torch.Tensor) -> None:
    """A tensor on another device than the group's is an error here, not a hang later.

    NCCL rejects CPU tensors (or, for some calls, blocks until the timeout), while gloo
    takes them silently, so a CPU test would never notice. A device comparison per call,
    no synchronisation.
    """
    expected = axis.device
    if expected is None:
        return
    for t in tensors:
        if t.device.type != expected.type or (
            expected.index is not None and t.device.index not in (None, expected.index)
        ):
            raise RuntimeError(
                f"comm.{call} over the {axis.name} group: tensor of shape {tuple(t.shape)} is "
                f"on {t.device}, but the group's device is {expected}; create it on "
                f"state.device"
            )


def seq_to_heads(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Ulysses forward all-to-all: ``(B, S/P, H, D) -> (B, S, H/P, D)``.

    Rank ``i`` holds sequence shard ``i``; afterwards it holds the whole (axis-local)
    sequence for head group ``i``.
    """
    p = axis.size
    if p == 1:
        return x
    _check_device("seq_to_heads", axis, x)
    b, s_local, h, d = x.shape
    # (B, S/P, H, D) -> (B, S/P, P, H/P, D) -> (P, B, S/P, H/P, D): chunk j goes to rank j
    send = x.reshape(b, s_local, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=axis.group)
    axis.stats.record("all_to_all", _nbytes(send) * (p - 1) // p)
    # recv[j] is rank j's sequence shard of my heads: (P, B, S/P, H/P, D) -> (B, S, H/P, D)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, p * s_local, h // p, d)


def heads_to_seq(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Ulysses inverse all-to-all: ``(B, S, H/P, D) -> (B, S/P, H, D)``."""
    p = axis.size
    if p == 1:
        return x
    _check_device("heads_to_seq", axis, x)
    b, s, h_local, d = x.shape
    # (B, S, H/P, D) -> (B, P, S/P, H/P, D) -> (P, B, S/P, H/P, D): sequence chunk j to rank j
    send = x.reshape(b, p, s // p, h_local, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=axis.group)
    axis.stats.record("all_to_all", _nbytes(send) * (p - 1) // p)
    # recv[j] is my sequence shard of rank j's heads: -> (B, S/P, P, H/P, D) -> (B, S/P, H, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h_local, d)


def all_gather(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order."""
    if axis.size == 1:
        return x
    _check_device("all_gather", axis, x)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x, group=axis.group)
    axis.stats.record("all_gather", _nbytes(x) * (axis.size - 1))
    return torch.cat(parts, dim=dim)


def all_reduce(x: torch.Tensor, axis: Axis, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the axis; returns ``x``."""
    if axis.size > 1:
        _check_device("all_reduce", axis, x)
        dist.all_reduce(x, op=op, group=axis.group)
        axis.stats.record("all_reduce", _nbytes(x))
    return x


def shard(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """This rank's equal chunk of ``x`` along ``dim`` (no communication)."""
    if axis.size == 1:
        return x
    size = x.shape[dim]
    if size % axis.size:
        raise ValueError(
            f"cannot shard dim {dim} of size {size} over {axis.size} {axis.name} ranks "
            f"evenly; pad it (auto_pad=True / sp_shard_with_padding)"
        )
    return x.chunk(axis.size, dim=dim)[axis.rank].contiguous()


class RingExchange:
    """Double-buffered peer-to-peer rotation around the ring axis.

    ``start(tensors)`` posts the send of ``tensors`` to the next ring rank and the
    receive of the previous rank's tensors of the same shapes; ``wait()`` returns the
    received tensors. Compute on the current block runs between the two calls, so the
    next block is in flight while this one is used.
    """

    def __init__(self, axis: Axis):
        self.axis = axis
        self.next = axis.global_rank(axis.rank + 1)
        self.prev = axis.global_rank(axis.rank - 1)
        self._reqs: list = []
        self._recv: list[torch.Tensor] = []

    def start(self, tensors: list[torch.Tensor]) -> None:
        assert not self._reqs, "wait() for the previous exchange first"
        _check_device("RingExchange.start", self.axis, *tensors)
        self._recv = [torch.empty_like(t) for t in tensors]
        ops = []
        for send, recv in zip(tensors, self._recv, strict=True):
            ops.append(dist.P2POp(dist.isend, send.contiguous(), self.next, self.axis.group))
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.axis.group))
            self.axis.stats.record("p2p", _nbytes(send))
        self._reqs = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for req in self._reqs:
            req.wait()
        self._reqs = []
        return self._recv


def broadcast_object(obj, axis: Axis, src: int = 0, group: dist.ProcessGroup | None = None):
    """Pickle ``obj`` on axis rank ``src`` and return it on every rank of the axis.

    For CPU metadata (requests, decisions), not tensors. ``group`` overrides
    ``axis.group`` when the axis has a CPU twin (a gloo group with the same members,
    e.g. ``ParallelState.cpu_group`` when the axis is the whole world on NCCL).
    Collective: every rank of the axis calls it, in the same order.
    """
    if axis.size == 1:
        return obj
    box = [obj if axis.rank == src else None]
    dist.broadcast_object_list(box, src=axis.global_rank(src), group=group or axis.group)
    return box[0]


def broadcast(x: torch.Tensor, axis: Axis, src_index: int = 0) -> torch.Tensor:
    """In-place broadcast of ``x`` from group rank ``src_index`` to every rank of the axis.

    Every rank passes a tensor of the same shape and dtype; returns ``x``.
    """
    if axis.size > 1:
        _check_device("broadcast", axis, x)
        dist.broadcast(x, src=axis.global_rank(src_index), group=axis.group)
        if axis.rank == src_index:
            axis.stats.record("broadcast", _nbytes(x))
    return x


_ALIGN = 64
"""Offsets of the tensors in a packed buffer (every dtype's view needs its alignment)."""


def broadcast_nested(obj, axis: Axis, src: int = 0):
    """``obj`` (dicts / lists / tuples holding tensors and plain values) from axis rank
    ``src`` to every rank of the axis, its tensors on ``axis.device``.

    The skeleton (plain values, each tensor's dtype and shape: a few hundred bytes) goes
    by :func:`broadcast_object`; the tensors' bytes, packed into ONE uint8 buffer on the
    device, by one :func:`broadcast`: embeddings are never copied to the host or pickled.
    Every rank gets views into that buffer (``src`` too, so all ranks compute from the
    same layout). Collective: every rank of the axis calls it, in the same order.
    """
    if axis.size == 1:
        return obj
    device = axis.device or torch.device("cpu")
    tensors: list[torch.Tensor] = []
    meta = None
    if axis.rank == src:
        skeleton = _strip(obj, tensors)
        meta = (skeleton, [(t.dtype, tuple(t.shape)) for t in tensors])
    skeleton, specs = broadcast_object(meta, axis, src)
    offsets, total = [], 0
    for dtype, shape in specs:
        offsets.append(total)
        total += -(-torch.Size(shape).numel() * dtype.itemsize // _ALIGN) * _ALIGN
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    views = [
        flat[o : o + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
        for o, (dtype, shape) in zip(offsets, specs, strict=True)
    ]
    if axis.rank == src:
        for view, t in zip(views, tensors, strict=True):
            view.copy_(t)  # on the device already: a device-to-device copy
    if total:
        broadcast(flat, axis, src)  # (total,) uint8: every tensor of ``obj`` at once
    return _fill(skeleton, views)


class _Slot:
    """Where tensor ``index`` of a packed buffer goes back into the skeleton."""

    def __init__(self, index: int):
        self.index = index


def _strip(obj, tensors: list):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj, views: list):
    if isinstance(obj, _Slot):
        return views[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, views) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_fill(v, views) for v in obj)
    return obj
