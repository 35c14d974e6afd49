"""The one entry point a model's attention processor calls: local, Ulysses, Ring, hybrid.

A processor holds ``q, k, v`` for its rank's image tokens ``(B, S/P, H, D)`` (sharded
along the sequence by the ``_sp_plan`` hooks) and, for joint attention, the text
``q, k, v`` ``(B, T, H, D)`` that every rank holds in full. Dispatch:

- sequence-parallel size 1: one local kernel call over the joint sequence;
- Ulysses (``u`` ranks): all-to-all turns sequence shards into head shards
  ``(B, S/P, H, D) -> (B, u*S/P, H/u, D)``; the text q/k/v are sliced to this rank's
  heads; the image output returns by the inverse all-to-all and the text output by an
  all-gather over heads;
- Ring (``r`` ranks): :func:`ithaca.parallel.ring.ring_attention` on the segment;
- hybrid: Ulysses inside each ring position, Ring across positions.

Sequence padding added by ``auto_pad`` sits at the end of the sequence, so it is
sliced off the keys rather than masked: the valid length of every block is a function
of positions (Python ints), so no mask is built, exchanged or all-gathered, and ranks
without padding run the unmasked kernel. A padded sequence attends exactly like the
unpadded one.

No host synchronisation per layer: the only data-dependent decision (is a replicated
text mask all True?) is taken once per mask tensor and remembered.
"""

from __future__ import annotations

import weakref

import torch

from ithaca.parallel import comm
from ithaca.parallel.kernels import local_attention
from ithaca.parallel.ring import Joint, ring_attention
from ithaca.parallel.state import ParallelState


class ParallelAttention:
    """Sequence-parallel joint attention over a :class:`ParallelState`.

    ``padding`` is the object that knows the valid length of an ``auto_pad``-ed
    sequence (the :class:`~ithaca.parallel.hooks.SequenceParallelRuntime` returned by
    ``apply_sequence_parallel``); without it no sequence padding is assumed.
    """

    def __init__(self, state: ParallelState, padding=None, convert_to_fp32: bool = True):
        self.state = state
        self.padding = padding
        self.accum_dtype = torch.float32 if convert_to_fp32 else None
        self.backend = state.config.attention_backend
        self._trivial: dict[int, tuple[weakref.ref, int, bool]] = {}

    def _drop_if_trivial(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """None for an all-True mask, decided once per mask tensor (one host sync).

        A model passes the same text mask object to every layer and step, so this
        syncs once per request, not once per layer. The mask is replicated, so every
        rank decides the same.
        """
        if mask is None:
            return None
        key = id(mask)
        # Inference tensors keep no version counter (they are treated as never changed).
        version = -1 if mask.is_inference() else mask._version
        seen = self._trivial.get(key)
        if seen is None or seen[0]() is not mask or seen[1] != version:
            if len(self._trivial) > 64:
                self._trivial = {k: e for k, e in self._trivial.items() if e[0]() is not None}
            seen = (weakref.ref(mask), version, bool(mask.all()))
            self._trivial[key] = seen
        return None if seen[2] else mask

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        joint_q: torch.Tensor | None = None,
        joint_k: torch.Tensor | None = None,
        joint_v: torch.Tensor | None = None,
        joint_mask: torch.Tensor | None = None,
        joint_strategy: str = "front",
        key_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(image_out (B, S/P, H, D), text_out (B, T, H, D) or None)``.

        ``joint_mask`` ``(B, T)`` and ``key_mask`` ``(B, S/P)`` are bool key masks
        (True = attend) for the text and for this rank's image tokens.
        """
        if joint_strategy not in ("front", "rear"):
            raise ValueError(f"joint_strategy ({joint_strategy!r}) must be 'front' or 'rear'")
        has_joint = joint_q is not None
        if has_joint and (joint_k is None or joint_v is None):
            raise ValueError("joint attention needs joint_q, joint_k and joint_v together")
        joint_mask = self._drop_if_trivial(joint_mask)
        state = self.state
        ulysses, ring = state.ulysses, state.ring
        accum = self.accum_dtype or q.dtype
        heads = q.shape[2]
        state.config.validate_heads(heads)

        # Global valid length of the image sequence (None: no auto_pad padding).
        local = q.shape[1]
        valid = None
        if self.padding is not None and state.sp.size > 1:
            valid = self.padding.valid_length(local * state.sp.size)

        if ulysses.size > 1:
            # q, k, v in one all-to-all: (3B, S/P, H, D) -> (3B, u*S/P, H/u, D)
            b = q.shape[0]
            q, k, v = comm.seq_to_heads(torch.cat([q, k, v]), ulysses).split(b)
            if key_mask is not None:  # a model's own mask is data: gather it
                key_mask = comm.all_gather(key_mask, ulysses, dim=1)  # (B, u*S/P)
            if has_joint:
                h_local = heads // ulysses.size
                heads_here = slice(ulysses.rank * h_local, (ulysses.rank + 1) * h_local)
                joint_q, joint_k, joint_v = (
                    t[:, :, heads_here] for t in (joint_q, joint_k, joint_v)
                )

        # Valid keys of each ring position's segment (seg = u*S/P tokens), or None.
        seg = k.shape[1]
        lengths = None
        if valid is not None:
            lengths = [min(max(valid - j * seg, 0), seg) for j in range(ring.size)]
        if ring.size == 1 and lengths is not None and lengths[0] < seg:
            # (B, S, H, D) -> (B, valid, H, D): padding keys are sliced off, not masked
            k, v = k[:, : lengths[0]], v[:, : lengths[0]]
            key_mask = None if key_mask is None else key_mask[:, : lengths[0]]

        joint = None
        if has_joint:
            joint = Joint(joint_q, joint_k, joint_v, joint_mask, joint_strategy == "front")
        if ring.size > 1:
            out, joint_out = ring_attention(
                q, k, v, key_mask, ring, joint, scale, accum, lengths, self.backend
            )
        else:
            out, joint_out = _local_joint(q, k, v, key_mask, joint, scale, self.backend)

        if ulysses.size > 1:
            out = comm.heads_to_seq(out, ulysses)  # (B, u*S/P, H/u, D) -> (B, S/P, H, D)
            if joint_out is not None:
                joint_out = comm.all_gather(joint_out, ulysses, dim=2)  # heads -> (B, T, H, D)
        return out, joint_out


def _local_joint(q, k, v, key_mask, joint: Joint | None, scale, backend):
    """One kernel call over the joint sequence, in the model's own token order.

    ``k, v`` may be shorter than ``q`` (padding sliced off); no log-sum-exp is needed.
    """
    kw = dict(backend=backend, need_lse=False)
    if joint is None:
        out, _ = local_attention(q, k, v, key_mask, scale, **kw)
        return out, None
    t, s = joint.q.shape[1], q.shape[1]
    pairs = ((joint.q, q), (joint.k, k), (joint.v, v))
    qq, kk, vv = (torch.cat([jt, it] if joint.front else [it, jt], dim=1) for jt, it in pairs)
    mask = None
    if key_mask is not None or joint.mask is not None:
        b = q.shape[0]
        jm = joint.mask if joint.mask is not None else q.new_ones(b, t, dtype=torch.bool)
        im = key_mask if key_mask is not None else q.new_ones(b, k.shape[1], dtype=torch.bool)
        mask = torch.cat([jm, im] if joint.front else [im, jm], dim=1)
    out, _ = local_attention(qq, kk, vv, mask, scale, **kw)
    if joint.front:
        return out[:, t:], out[:, :t]
    return out[:, :s], out[:, s:]
