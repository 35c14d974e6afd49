"""Bagel's generation maths: KV-cache contexts, the query block, CFG with renorm, the
rectified-flow schedule and latent (un)patchify. Plain functions over :class:`Bagel`.

Conventions (those of the official inferencer; ``../shared/bagel-golden/README.md``):

- a context is a per-layer KV cache plus the next free RoPE position; text takes
  consecutive positions, a whole image block (markers included) shares one position;
- the query block ``[<|vision_start|>, N latents, <|vision_end|>]`` sits at the context's
  next position, sees the whole context and itself, and is never cached;
- t = 1 is noise, the Euler step is ``x <- x - v * dt``; N timesteps give N-1 calls
  (diffusers' ``FlowMatchEulerDiscreteScheduler``, :func:`scheduler`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ithaca.models.bagel.model import Bagel
from ithaca.models.spec import plain_cfg

RENORM_TYPES = ("global", "channel", "text_channel")


@dataclass
class Context:
    """A KV cache (per layer ``(k, v)``, (1, KV, L, head_dim)) and its next position."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    next_pos: int = 0

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
        store: list = []  # per layer: the context's (k, v) with this segment's appended
        model.run(rows, positions, gen, causal, past=self.kv, store=store)
        return Context(store, self.next_pos + span)


def marker_block(model: Bagel, inner: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``[emb(start), inner rows, emb(end)]`` (n + 2, D)."""
    ids = torch.tensor([start, end], device=inner.device)
    marks = model.llm.embed_tokens(ids).to(inner.dtype)
    return torch.cat([marks[:1], inner, marks[1:]])


def latent_positions(h: int, w: int, max_size: int, device=None) -> torch.Tensor:
    """``row * max_size + col`` over an (h, w) token grid in row-major order."""
    rows = torch.arange(h, device=device)[:, None] * max_size
    return (rows + torch.arange(w, device=device)[None, :]).flatten()


def patchify(latent: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(1, C, p*h, p*w) -> tokens (h*w, p*p*C) indexed ``(p_row * p + p_col) * C + c``:
    VAE latents (p = 2) and ViT pixel patches (p = 14) alike, patches row-major."""
    _, c, hh, ww = latent.shape
    x = latent[0].view(c, hh // p, p, ww // p, p)  # (C, h, pr, w, pc)
    return x.permute(1, 3, 2, 4, 0).reshape((hh // p) * (ww // p), p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, c: int = 16, p: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`: tokens (h*w, p*p*C) -> (1, C, p*h, p*w)."""
    x = tokens.view(h, w, p, p, c).permute(4, 0, 2, 1, 3)  # (C, h, pr, w, pc)
    return x.reshape(1, c, h * p, w * p)


def scheduler(params: SamplingParams, device=None) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' flow-matching Euler scheduler on Bagel's schedule: ``t = s*u / (1 +
    (s-1)*u)`` over ``u = linspace(1, 0, num_timesteps)`` (the final 0 is the scheduler's
    end), ``timesteps`` the raw t (``num_train_timesteps`` 1). Bit for bit the official
    fp32 schedule and Euler step ``x - v * dt``."""
    schedule = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=params.timestep_shift)
    u = torch.linspace(1, 0, params.num_timesteps)[:-1]
    schedule.set_timesteps(sigmas=u.numpy(), device=device)
    return schedule


def guided(t: float, params: SamplingParams) -> bool:
    """Whether step ``t`` runs the guidance branches: ``lo < t <= hi`` and text scale > 1."""
    lo, hi = params.cfg_interval
    return params.cfg_text_scale > 1.0 and lo < t <= hi


def _renorm(v_c: torch.Tensor, a: torch.Tensor, per_token: bool, floor: float) -> torch.Tensor:
    """``a * clamp(|v_c| / (|a| + 1e-8), floor, 1)``, norms over all or per token."""
    over = {"dim": -1, "keepdim": True} if per_token else {}
    return a * (v_c.norm(**over) / (a.norm(**over) + 1e-8)).clamp(min=floor, max=1.0)


def combine(v: dict[str, torch.Tensor], p: SamplingParams) -> torch.Tensor:
    """Bagel's CFG of the branch velocities ``v`` (:func:`plain_cfg` twice): text guidance,
    then image guidance (if a ``cfg_img`` velocity ran), renormed to the cond velocity's
    norm (``text_channel``: per token, in between)."""
    text_channel = p.cfg_renorm_type == "text_channel"
    a = plain_cfg(v["cond"], v["cfg_text"], p.cfg_text_scale)
    if text_channel:
        a = _renorm(v["cond"], a, True, p.cfg_renorm_min)
    a = plain_cfg(a, v.get("cfg_img"), p.cfg_img_scale)  # without cfg_img: a itself
    if not text_channel:
        a = _renorm(v["cond"], a, p.cfg_renorm_type == "channel", p.cfg_renorm_min)
    return a


@dataclass(frozen=True)
class SamplingParams:
    """Bagel's sampling settings; defaults are ``InterleaveInferencer``'s."""

    cfg_text_scale: float = 3.0
    """Text guidance (cond vs the context without the text); <= 1 turns all CFG off."""
    cfg_img_scale: float = 1.5
    """Image guidance (cond vs the context without the input image), on when > 1."""
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    """Guidance applies at timesteps ``lo < t <= hi`` (t = 1 is noise)."""
    cfg_renorm_type: str = "global"
    """``global`` / ``channel`` / ``text_channel`` norm rescaling of the guided velocity."""
    cfg_renorm_min: float = 0.0
    """Lower clamp of the renorm factor (1.0 disables renorm)."""
    timestep_shift: float = 3.0
    """Schedule shift ``s``: ``t = s*u / (1 + (s-1)*u)``."""
    num_timesteps: int = 50
    """Schedule length; the model runs ``num_timesteps - 1`` steps."""

    def __post_init__(self):
        try:  # a JSON list (a request) as well as a tuple
            interval = tuple(float(v) for v in self.cfg_interval)
        except (TypeError, ValueError):
            interval = ()
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
            message = f"cfg_interval ({self.cfg_interval!r}) must be [lo, hi], 0 <= lo <= hi <= 1"
            raise ValueError(message)
        object.__setattr__(self, "cfg_interval", interval)
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(
                f"cfg_renorm_type ({self.cfg_renorm_type!r}) must be one of {RENORM_TYPES}"
            )
        for name in ("cfg_text_scale", "cfg_img_scale", "cfg_renorm_min", "timestep_shift"):
            value = getattr(self, name)  # from a request: any JSON value
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} ({value!r}) must be a number >= 0")
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift ({self.timestep_shift!r}) must be > 0")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ValueError(f"num_timesteps ({self.num_timesteps!r}) must be an integer >= 2")


BRANCHES = ("cond", "cfg_text", "cfg_img")


def build_contexts(model: Bagel, prompt_block: torch.Tensor, markers, image=None) -> dict:
    """The three contexts: cond = [image] + text, cfg_text = [image], cfg_img = text;
    ``image``: an edit's input (:func:`ithaca.models.bagel.inputs.encode_image`).

    In text-to-image the cfg_img context is the cond context itself (identical prefill).
    """
    ctx = Context()
    if image is not None:
        cfg = model.cfg
        device = prompt_block.device
        pos = latent_positions(*image["vae_grid"], cfg.max_latent_size, device)
        zero = torch.zeros((), device=device)
        lat = marker_block(model, model.embed_latents(image["vae_tokens"], zero, pos), *markers)
        ctx = ctx.prefill(model, lat, slice(1, lat.shape[0] - 1), causal=False, span=1)
        pos = latent_positions(*image["vit_grid"], cfg.vit_max_num_patch_per_side, device)
        vit = marker_block(model, model.embed_vit(image["vit_patches"], pos), *markers)
        ctx = ctx.prefill(model, vit, None, causal=False, span=1)
    rows = model.llm.embed_tokens(prompt_block)
    n = prompt_block.shape[0]
    cond = ctx.prefill(model, rows, None, causal=True, span=n)
    if image is None:
        return {"cond": cond, "cfg_text": Context(), "cfg_img": cond}
    text_only = Context().prefill(model, rows, None, causal=True, span=n)
    return {"cond": cond, "cfg_text": ctx, "cfg_img": text_only}


@dataclass
class Query:
    """What every step of one image's loop reads (besides x and t)."""

    contexts: dict[str, Context]
    pos: torch.Tensor
    """``latent_positions`` of the latent token grid."""
    params: SamplingParams
    guided: list[bool]
    """Per step: whether it runs the guidance branches (:func:`guided`), decided before
    the loop from the host schedule."""
    markers: tuple[int, int]
    """The ``<|vision_start|>`` and ``<|vision_end|>`` ids."""

    def velocity(self, model: Bagel, x, t, i: int, scope=None) -> tuple[torch.Tensor, dict]:
        """The velocity (N, p*p*C) the Euler step of step ``i`` (time ``t``) takes, fp32,
        and every branch's, for latent tokens ``x`` (N, p*p*C): cond and, if guided, the
        guidance branches, combined (:func:`combine`); the query block is embedded once for
        all. ``scope(branch index)`` brackets each branch's decoder run (step caches). In
        text-to-image the cfg_img context is the cond one: not rerun."""
        on, p, n = self.guided[i], self.params, x.shape[0]
        rows = marker_block(model, model.embed_latents(x, t, self.pos), *self.markers)
        v = {}
        for b, name in enumerate(BRANCHES[: 1 if not on else 3 if p.cfg_img_scale > 1 else 2]):
            ctx = self.contexts[name]
            if name == "cfg_img" and ctx is self.contexts["cond"]:
                v[name] = v["cond"]  # identical context: identical velocity
                continue
            positions = torch.full((n + 2,), ctx.next_pos, device=x.device)
            with scope(b) if scope else contextlib.nullcontext():
                hidden = model.run(rows, positions, slice(1, n + 1), causal=False, past=ctx.kv)
            v[name] = model.llm2vae(hidden[1 : n + 1]).float()
        return (combine(v, p) if on else v["cond"]), v
