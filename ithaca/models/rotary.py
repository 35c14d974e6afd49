"""Rotary position embeddings in the real ``(cos, sin)`` form, shared by the families.

Qwen-Image's reference (diffusers' ``apply_rotary_emb_qwen(use_real=False)``) rotates
interleaved pairs ``(x[2i], x[2i+1])`` by multiplying them, as complex numbers, with
complex frequencies. The same rotation written with real tensors,

    out[2i]   = x[2i] * cos_i - x[2i+1] * sin_i
    out[2i+1] = x[2i] * sin_i + x[2i+1] * cos_i,

is what inductor can compile (it generates no code for complex operators), so a
compiled block (``--compile``) runs it fused instead of falling back to eager kernels.
The frequencies are kept as ``torch.view_as_real(freqs)``: ``(..., D/2, 2)`` with
``[..., 0] = cos`` and ``[..., 1] = sin``, the very numbers of the complex tensor.
"""

from __future__ import annotations

import torch
from torch import nn


def real_freqs(freqs: torch.Tensor) -> torch.Tensor:
    """Complex ``(..., D/2)`` -> real ``(..., D/2, 2)`` (cos, sin); real input unchanged."""
    return torch.view_as_real(freqs) if freqs.is_complex() else freqs


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, H, D)`` by ``freqs`` ``(S, D/2, 2)`` (or complex ``(S, D/2)``).

    Computed in float32 and returned in ``x``'s dtype, as the reference does.
    """
    freqs = real_freqs(freqs).float()
    cos, sin = freqs[..., 0].unsqueeze(-2), freqs[..., 1].unsqueeze(-2)  # (S, 1, D/2)
    # (B, S, H, D) -> two (B, S, H, D/2): the even and odd members of each pair
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)  # (B, S, H, D/2, 2) -> (B, S, H, D)


def _outputs_to_real(module: nn.Module, args, output):
    return tuple(real_freqs(f) if isinstance(f, torch.Tensor) else f for f in output)


def use_real_freqs(rope: nn.Module):
    """Make a RoPE module that returns complex frequencies (a tuple of them, as
    Qwen-Image's ``pos_embed``) return their real ``(..., D/2, 2)`` form instead.

    Registered when the model is built, before any sequence-parallel hook, so a plan
    that shards these outputs sees the real form. Returns the hook handle.
    """
    return rope.register_forward_hook(_outputs_to_real)
