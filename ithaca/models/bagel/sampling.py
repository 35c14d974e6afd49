"""Bagel's generation maths: KV-cache contexts, the query block, CFG with renorm, the
rectified-flow schedule and latent (un)patchify. Plain functions over :class:`Bagel`.

Conventions (those of the official inferencer; ``../shared/bagel-golden/README.md``):

- a context is a per-layer KV cache plus the next free RoPE position; text takes
  consecutive positions, a whole image block (markers included) shares one position;
- the query block ``[<|vision_start|>, N latents, <|vision_end|>]`` sits at the context's
  next position, sees the whole context and itself, and is never cached;
- t = 1 is noise, the Euler step is ``x <- x - v * dt``; N timesteps give N-1 calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ithaca.models.bagel.model import Bagel

RENORM_TYPES = ("global", "channel", "text_channel")


@dataclass
class Context:
    """A KV cache (per layer ``(k, v)``, (1, KV, L, head_dim)) and its next position."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    next_pos: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)
    """Final-norm outputs of each prefill segment (for checks; the model discards them)."""

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv[0][0].shape[2]

    def fork(self) -> Context:
        """A copy that can grow on its own (tensors are never modified in place)."""
        return Context(self.kv, self.next_pos, list(self.outputs))

    def prefill(
        self, model: Bagel, rows: torch.Tensor, gen: slice | None, causal: bool, span: int
    ) -> Context:
        """Append ``rows`` (S, D): a text segment (``causal``, ``span`` = S positions) or an
        image block (full attention, ``span`` = 1 shared position)."""
        s = rows.shape[0]
        if causal:
            positions = torch.arange(self.next_pos, self.next_pos + s, device=rows.device)
        else:
            positions = torch.full((s,), self.next_pos, device=rows.device)
        store: list = []
        out = model.run(rows, positions, gen, causal, past=self.kv, store=store)
        if self.kv is None:
            kv = store
        else:
            kv = [(torch.cat([k0, k], 2), torch.cat([v0, v], 2)) for (k0, v0), (k, v) in zip(
                self.kv, store, strict=True
            )]
        return Context(kv, self.next_pos + span, [*self.outputs, out])


def marker_block(model: Bagel, inner: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``[emb(start), inner rows, emb(end)]`` (n + 2, D)."""
    ids = torch.tensor([start, end], device=inner.device)
    marks = model.embed_text(ids).to(inner.dtype)
    return torch.cat([marks[:1], inner, marks[1:]])


def latent_positions(h: int, w: int, max_size: int, device=None) -> torch.Tensor:
    """``row * max_size + col`` over an (h, w) token grid in row-major order."""
    rows = torch.arange(h, device=device)[:, None] * max_size
    return (rows + torch.arange(w, device=device)[None, :]).flatten()


def patchify(latent: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(1, C, p*h, p*w) -> tokens (h*w, p*p*C) indexed ``(p_row * p + p_col) * C + c``."""
    _, c, hh, ww = latent.shape
    x = latent[0].view(c, hh // p, p, ww // p, p)  # (C, h, pr, w, pc)
    return x.permute(1, 3, 2, 4, 0).reshape((hh // p) * (ww // p), p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, c: int = 16, p: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`: tokens (h*w, p*p*C) -> (1, C, p*h, p*w)."""
    x = tokens.view(h, w, p, p, c).permute(4, 0, 2, 1, 3)  # (C, h, pr, w, pc)
    return x.reshape(1, c, h * p, w * p)


def vit_patches(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """(3, H, W) -> patch rows (h*w, p*p*3), channel fastest, patches row-major."""
    c, hh, ww = pixels.shape
    x = pixels.view(c, hh // p, p, ww // p, p).permute(1, 3, 2, 4, 0)  # (h, w, pr, pc, C)
    return x.reshape((hh // p) * (ww // p), p * p * c)


def velocity(
    model: Bagel, ctx: Context, x: torch.Tensor, t: torch.Tensor, pos: torch.Tensor, markers
) -> torch.Tensor:
    """One branch's velocity (N, p*p*C) of latent tokens ``x`` (N, p*p*C) at time ``t``
    under context ``ctx``; ``markers`` = (vision start id, vision end id)."""
    rows = marker_block(model, model.embed_latents(x, t, pos), *markers)
    n = x.shape[0]
    positions = torch.full((n + 2,), ctx.next_pos, device=x.device)
    hidden = model.run(rows, positions, slice(1, n + 1), causal=False, past=ctx.kv)
    return model.llm2vae(hidden[1 : n + 1])


def schedule(num_timesteps: int, shift: float) -> torch.Tensor:
    """Shifted timesteps from 1 to 0 (fp32): ``t = s*u / (1 + (s-1)*u)``."""
    u = torch.linspace(1, 0, num_timesteps)
    return shift * u / (1 + (shift - 1) * u)


def guided(t: float, cfg_text_scale: float, interval: tuple[float, float]) -> bool:
    """Whether step ``t`` runs the guidance branches: ``lo < t <= hi`` and text scale > 1."""
    return cfg_text_scale > 1.0 and interval[0] < t <= interval[1]


def _renorm(v_c: torch.Tensor, a: torch.Tensor, per_token: bool, floor: float) -> torch.Tensor:
    """``a * clamp(|v_c| / (|a| + 1e-8), floor, 1)``, norms over all or per token."""
    if per_token:
        ratio = v_c.norm(dim=-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) + 1e-8)
    else:
        ratio = v_c.norm() / (a.norm() + 1e-8)
    return a * ratio.clamp(min=floor, max=1.0)


def combine(
    v_cond: torch.Tensor,
    v_text: torch.Tensor,
    v_img: torch.Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """Bagel's CFG: text guidance, then image guidance (if ``img_scale`` > 1), renormed."""
    a = v_text + text_scale * (v_cond - v_text)
    if renorm_type == "text_channel":
        a = _renorm(v_cond, a, True, renorm_min)
        return v_img + img_scale * (a - v_img) if img_scale > 1.0 else a
    if img_scale > 1.0:
        a = v_img + img_scale * (a - v_img)
    return _renorm(v_cond, a, renorm_type == "channel", renorm_min)
