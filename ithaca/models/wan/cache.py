"""How Wan2.2's blocks look to the step caches: one cache per expert.

A Wan block returns only the video tokens (the text is read by cross-attention and
never changed), so caches replace the video tokens' residual alone. The TeaCache
indicator is the block's first modulated input, ``norm1(x) * (1 + scale) + shift``,
with the per-token modulation of TI2V-5B (``temb`` of shape (B, S, 6, C), sharded with
the tokens) or the per-sample one of the A14B experts.

TeaCache coefficients: none are published for Wan2.2 that we could verify, so the
experts default to the uncalibrated identity (TeaCache logs a warning); fit them with
``ithaca calibrate-teacache`` and ship them in the checkpoint's ``ithaca.json``.
"""

from __future__ import annotations

import torch

from ithaca.cache import BlockCacheAdapter


def modulated_input(block: torch.nn.Module, args: dict) -> torch.Tensor:
    temb, hidden = args["temb"], args["hidden_states"]
    if temb.ndim == 4:  # (B, S, 6, C): per-token modulation (TI2V-5B)
        shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:  # (B, 6, C)
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return block.norm1(hidden.float()) * (1 + scale) + shift


WAN_CACHE = BlockCacheAdapter(blocks="blocks", returns="hidden", modulated_input=modulated_input)
