"""What every family's parallel attention processor shares: projections in, projection out.

A family's processor (``<family>/transformer.py``) keeps only what is its own (RoPE,
masks, the joint layout); the diffusers ``Attention`` module's projections and norms are
read here, in one place, by the names diffusers gives them.
"""

from __future__ import annotations

import torch

from ithaca.parallel import SequenceParallelRuntime

IMAGE = (("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
"""The image (or only) stream's projections and QK norms."""
TEXT = (("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
"""The text stream's, in joint (MMDiT) attention."""


def project(attn, x: torch.Tensor, names=IMAGE) -> tuple[torch.Tensor, ...]:
    """``(B, L, H*D) -> q, k, v (B, L, H, D)`` through ``attn``'s projections ``names``,
    then its QK norms where the module has them."""
    projections, norms = names
    q, k, v = (getattr(attn, p)(x).unflatten(-1, (attn.heads, -1)) for p in projections)
    norm_q, norm_k = (getattr(attn, n, None) for n in norms)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def project_out(attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, L, H, D) -> (B, L, H*D)`` in ``dtype`` through ``to_out`` (the linear, then the
    dropout where there is one)."""
    out = attn.to_out[0](out.flatten(2, 3).to(dtype).contiguous())
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class ParallelProcessor:
    """Base of the families' processors: attention runs through ``runtime``
    (:class:`ithaca.parallel.ParallelAttention` with the layout's Ulysses / Ring groups)."""

    family = "this"
    """The family's name in error messages."""
    mask_arg: str | None = None
    """The diffusers argument that carries the family's key mask (``"attention_mask"`` or
    ``"encoder_hidden_states_mask"``); any other mask given is refused."""

    def __init__(self, runtime: SequenceParallelRuntime):
        self.runtime = runtime

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb=None,
        image_rotary_emb=None,
        freqs_cis: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
    ):
        """What diffusers calls: the union of its processors' arguments, by name (its
        ``Attention`` drops keyword arguments the signature does not list). FLUX and Wan
        pass their RoPE fifth by position, the others by name; one of them is the RoPE."""
        masks = {
            "attention_mask": attention_mask,
            "encoder_hidden_states_mask": encoder_hidden_states_mask,
        }
        for name, mask in masks.items():
            if mask is not None and name != self.mask_arg:
                raise ValueError(f"{self.family} attention takes no {name}")
        rope = next((r for r in (rotary_emb, image_rotary_emb, freqs_cis) if r is not None), None)
        mask = masks.get(self.mask_arg)
        return self.attend(attn, hidden_states, encoder_hidden_states, rope, mask)

    def attend(self, attn, x: torch.Tensor, text: torch.Tensor | None, rope, mask):
        """The family's attention: image (or only) tokens ``x`` ``(B, S/P, C)``, the text
        ``(B, T, C)`` or None, the RoPE diffusers passed and the key mask (``mask_arg``)."""
        raise NotImplementedError
