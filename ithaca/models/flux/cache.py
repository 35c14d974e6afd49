"""How FLUX.1's blocks look to the step caches (``ithaca.cache``); LongCat-Image(-Edit),
Ovis-Image and SD3 / SD3.5 have the same kind of blocks and use this adapter too.

The stack is the double-stream ``transformer_blocks`` followed by the single-stream
``single_transformer_blocks``, one stack to a cache. In diffusers 0.42 both kinds take
``hidden_states`` (this rank's image tokens) and ``encoder_hidden_states`` (the whole
text) separately and return ``(text, image)``; a single-stream block concatenates
``[text, image]`` only inside its forward. So:

- TeaCache's indicator is the first double-stream block's ``norm1`` output, the
  timestep-modulated image input ``LayerNorm(x) * (1 + scale) + shift``, as TeaCache's
  FLUX.1 implementation probes it; a skipped step adds the image residual
  ``stack output - stack input`` over all blocks (the text the stack would have produced
  is not needed: ``norm_out`` and ``proj_out`` read the image tokens only);
- DBCache's first ``Fn`` blocks are double-stream blocks, its middle runs across both
  kinds, its last ``Bn`` blocks are single-stream blocks that read the text, so the text
  residual of the middle is remembered too.

SD3 / SD3.5 (``blocks="transformer_blocks"``) is one stack of MMDiT blocks of the same
form; its last block is ``context_pre_only`` and returns ``(None, image)``, which a skipped
step does not need either. TeaCache probes block 0's ``norm1`` as here (SD3.5-medium's
``AdaLayerNormZeroX`` returns the modulated input first too).

TeaCache coefficients: TeaCache's published FLUX.1-dev fit, also for FLUX.1-schnell,
LongCat-Image, Ovis-Image and SD3 / SD3.5 (the same double-stream block and probe; no fit
of their own published), unless the checkpoint's ``ithaca.json`` carries its own
(``ithaca calibrate-teacache``).
"""

from __future__ import annotations

import torch

from ithaca.cache import FLUX_COEFFICIENTS, BlockCacheAdapter, checkpoint_coefficients

FLUX_BLOCKS = ("transformer_blocks", "single_transformer_blocks")


def norm1_modulated_input(block: torch.nn.Module, args: dict) -> torch.Tensor:
    """``norm1(hidden_states, temb)``'s modulated image tokens: an ``AdaLayerNormZero``
    (FLUX, LongCat, Ovis, SD3) or SD3.5's ``AdaLayerNormZeroX``, both return it first."""
    return block.norm1(args["hidden_states"], emb=args["temb"])[0]


def cache_adapter(model_dir: str | None = None, blocks=FLUX_BLOCKS) -> BlockCacheAdapter:
    """The adapter over ``blocks``, with the checkpoint's fitted coefficients if any."""
    return BlockCacheAdapter(
        blocks=blocks,
        modulated_input=norm1_modulated_input,
        teacache_coefficients=checkpoint_coefficients(model_dir, FLUX_COEFFICIENTS),
    )
