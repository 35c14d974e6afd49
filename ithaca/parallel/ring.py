"""Ring attention: K/V blocks rotate around the ring axis, partials merge by log-sum-exp.

Every ring rank holds one contiguous segment of the image sequence (``S_seg`` tokens)
and, optionally, the whole joint text sequence. Image queries see every image block
once (their own first, then the previous rank's, ...) and the text keys exactly once,
as a separate partial, never once per ring step. A key mask travels with its block.
``auto_pad`` padding is not masked but sliced off: the valid length of each block is a
function of its ring position, so a block keeps its first ``key_lengths[j]`` keys, and
a block that is all padding is skipped (it still travels: every rank sends and
receives at every step).

Text queries are merged in a fixed order (text keys, then image blocks 0..R-1), so all
ring ranks hold bit-identical text outputs, as they would after a broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ithaca.parallel.comm import RingExchange
from ithaca.parallel.kernels import local_attention, merge_partials
from ithaca.parallel.state import Axis


@dataclass
class Joint:
    """Replicated text q/k/v ``(B, T, H, D)`` attended jointly with the image tokens."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None
    """``(B, T)`` bool key mask for the text keys (padded prompts), or None."""
    front: bool = True
    """Text precedes the image tokens in the joint sequence (Qwen-Image, FLUX)."""


def _accumulate(acc, part, dtype):
    if part is None:  # a block made only of padding
        return acc
    out, lse = part
    if acc is None:
        return out.to(dtype), lse
    return merge_partials(acc[0], acc[1], out, lse)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    axis: Axis,
    joint: Joint | None = None,
    scale: float | None = None,
    accum_dtype: torch.dtype = torch.float32,
    key_lengths: list[int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention over the whole ring; returns ``(image_out, text_out)``.

    ``q, k, v``: ``(B, S_seg, H, D)`` this rank's image segment; ``key_mask``:
    ``(B, S_seg)`` bool or None; ``key_lengths[j]``: keys of ring rank ``j``'s block
    that are not padding (None: all). Collective over ``axis``.
    """
    size, rank = axis.size, axis.rank

    def attend(query, keys, values, mask, source):
        n = keys.shape[1] if key_lengths is None else key_lengths[source]
        if n == 0:
            return None
        if n < keys.shape[1]:  # (B, S_seg, H, D) -> (B, n, H, D): padding sliced off
            keys, values = keys[:, :n], values[:, :n]
            mask = None if mask is None else mask[:, :n]
        return local_attention(query, keys, values, mask, scale, backend=backend)

    acc_img = None
    txt_keys_part = None
    txt_parts: list = [None] * size
    if joint is not None:
        # Text keys: one partial for image queries and one for text queries, once.
        acc_img = _accumulate(
            None,
            local_attention(q, joint.k, joint.v, joint.mask, scale, backend=backend),
            accum_dtype,
        )
        txt_keys_part = local_attention(
            joint.q, joint.k, joint.v, joint.mask, scale, backend=backend
        )

    # (2, B, S_seg, H, D): K and V travel as one message; the mask travels beside them.
    kv = torch.stack([k, v])
    mask = key_mask
    exchange = RingExchange(axis)
    for step in range(size):
        source = (rank - step) % size  # ring rank whose block we hold now
        if step < size - 1:
            exchange.start([kv] if mask is None else [kv, mask])
        acc_img = _accumulate(acc_img, attend(q, kv[0], kv[1], mask, source), accum_dtype)
        if joint is not None:
            txt_parts[source] = attend(joint.q, kv[0], kv[1], mask, source)
        if step < size - 1:
            received = exchange.wait()
            kv = received[0]
            mask = received[1] if mask is not None else None

    out_img = acc_img[0].to(q.dtype)
    if joint is None:
        return out_img, None
    acc_txt = _accumulate(None, txt_keys_part, accum_dtype)
    for part in txt_parts:  # fixed order: identical bits on every ring rank
        acc_txt = _accumulate(acc_txt, part, accum_dtype)
    return out_img, acc_txt[0].to(joint.q.dtype)
