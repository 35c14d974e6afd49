"""How Z-Image's blocks look to the step caches (``ithaca.cache``).

Z-Image's forward refines the image tokens (``noise_refiner``) and the caption
(``context_refiner``) apart, concatenates them into one ``[image, caption]`` sequence
inside the forward, and runs that unified sequence through ``layers``: blocks taking
``x`` (this rank's shard of the unified sequence) and returning it. The caches cover
``layers``, the bulk of the work; the two-block refiners run on every step (their
output is the stack's input, which a skipped step adds the remembered residual to).

- TeaCache's indicator is the first layer's modulated input
  ``attention_norm1(x) * (1 + scale_msa)`` over the unified sequence (Z-Image's
  modulation has a scale and a gate, no shift); a skipped step adds the residual of
  ``layers`` to every token, image and caption alike;
- DBCache's ``Fn`` / middle / ``Bn`` split is over ``layers``, one tensor (no separate
  text residual).

TeaCache coefficients: none are published for Z-Image. The architecturally closest
published fit, TeaCache's Lumina-Image-2.0 one (the same modulated-input form), turns
negative above a relative change of about 0.28 (a negative estimate would make TeaCache
skip more the more the input moves; few-step runs go there: the tiny checkpoint changes
by 0.42-0.48 per step at 5 steps), so the default is FLUX.1's fit (above 0.18
everywhere, increasing beyond a change of 0.05); fit Z-Image's own with ``ithaca
calibrate-teacache`` and ship it in the checkpoint's ``ithaca.json``.
"""

from __future__ import annotations

import torch

from ithaca.cache import FLUX_COEFFICIENTS, BlockCacheAdapter, checkpoint_coefficients


def modulated_input(block: torch.nn.Module, args: dict) -> torch.Tensor:
    """``attention_norm1(x) * (1 + scale_msa)`` of a main layer (per-sample modulation)."""
    if args.get("noise_mask") is not None:
        raise ValueError("Z-Image's per-token (omni) modulation has no TeaCache indicator")
    # (B, 4*C) -> (B, 1, C): scale_msa, the first of scale/gate for attention and MLP
    scale_msa = block.adaLN_modulation(args["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
    return block.attention_norm1(args["x"]) * (1.0 + scale_msa)  # (B, S/P, C)


def cache_adapter(model_dir: str | None = None) -> BlockCacheAdapter:
    return BlockCacheAdapter(
        blocks="layers",
        hidden_arg="x",
        returns="hidden",
        modulated_input=modulated_input,
        teacache_coefficients=checkpoint_coefficients(model_dir, FLUX_COEFFICIENTS),
    )
