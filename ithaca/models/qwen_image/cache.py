"""How Qwen-Image's blocks look to the step caches (``ithaca.cache``).

The TeaCache indicator is the first block's timestep-modulated image input, computed
exactly as the block computes it (``img_norm1`` then the ``img_mod`` shift/scale,
honouring ``modulate_index`` for ``zero_cond_t`` checkpoints).

TeaCache coefficients: no calibration of Qwen-Image itself has been published that we
could verify; peer systems reuse the FLUX.1 coefficients from the TeaCache paper, and
so do we by default. A checkpoint may carry its own fitted coefficients in
``ithaca.json`` (``{"teacache_coefficients": [...]}``), which ``ithaca
calibrate-teacache`` writes.
"""

from __future__ import annotations

import torch

from ithaca.cache import FLUX_COEFFICIENTS, BlockCacheAdapter, checkpoint_coefficients


def modulated_input(block: torch.nn.Module, args: dict) -> torch.Tensor:
    """``img_norm1(hidden_states) * (1 + scale) + shift`` of the block's first half."""
    img_mod1 = block.img_mod(args["temb"]).chunk(2, dim=-1)[0]  # (B, 3*dim)
    normed = block.img_norm1(args["hidden_states"])
    modulated, _ = block._modulate(normed, img_mod1, args.get("modulate_index"))
    return modulated


def cache_adapter(model_dir: str | None = None) -> BlockCacheAdapter:
    """The adapter, with coefficients from the checkpoint's ``ithaca.json`` if present."""
    return BlockCacheAdapter(
        blocks="transformer_blocks",
        modulated_input=modulated_input,
        teacache_coefficients=checkpoint_coefficients(model_dir, FLUX_COEFFICIENTS),
    )
