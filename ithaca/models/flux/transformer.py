"""FLUX.1's transformer under sequence parallelism: the ``_sp_plan`` and the processor.

The math is diffusers' ``FluxTransformer2DModel``; this module declares where its
sequence is split and installs the joint attention processor
(:class:`ithaca.models.attention.JointAttnProcessor`) on both kinds of block.

Plan (``auto_pad`` wherever the image length may not divide by the sequence-parallel
size):

- root input ``hidden_states`` ``(B, S_img, C_in)``: the packed latents, sharded on
  dim 1 before ``x_embedder``; every block then works on ``S_img/P`` image tokens;
- root input ``img_ids`` ``(S_img, 3)``: sharded on dim 0 the same way, so the forward's
  own ``cat(txt_ids, img_ids)`` and ``pos_embed`` yield the RoPE of
  ``[whole text, this rank's image tokens]`` ``(T + S_img/P, D)``;
- ``proj_out`` output ``(B, S_img, C_out)``: gathered on dim 1 (padding trimmed).

Text tokens stay replicated. Double-stream blocks keep text and image apart, so their
processor sees both directly. Single-stream blocks concatenate ``[text, image shard]``
inside their forward; their processor splits that sequence again at the text length,
which a forward pre-hook on each single block reads from the block's
``encoder_hidden_states`` input just before the block runs, so no diffusers forward
is copied. LongCat-Image and Ovis-Image share this layout and reuse plan and processor.

Step caches (:data:`FLUX_CACHE`; LongCat-Image, Ovis-Image and SD3 / SD3.5 have the
same kind of blocks and use it too): the double-stream ``transformer_blocks`` then the
single-stream ``single_transformer_blocks`` are one stack. In diffusers 0.42 both kinds
take ``hidden_states`` (this rank's image tokens) and ``encoder_hidden_states`` (the
whole text) apart and return ``(text, image)``; a single-stream block concatenates
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
from diffusers import FluxTransformer2DModel as _DiffusersFluxTransformer
from diffusers.hooks.tensor_parallel import PackedColwiseParallel, PackedRowwiseParallel

from ithaca.cache import FLUX_COEFFICIENTS, BlockCacheAdapter
from ithaca.models.attention import JointAttnProcessor, flux_rope
from ithaca.parallel import SequenceParallelInput, SequenceParallelOutput
from ithaca.parallel.tensor import GATHERED_COLWISE
from ithaca.runtime.parallelize import AttentionLayout

FLUX_SP_PLAN = {
    "": {
        "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True),
        "img_ids": SequenceParallelInput(split_dim=0, expected_dims=2, auto_pad=True),
    },
    "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
}


FLUX_TP_PLAN = {
    **_DiffusersFluxTransformer._tp_plan,
    # AdaLN modulation (C -> 6C per stream, 3C per single block, 2C at the end): split by
    # rows, gathered whole
    "transformer_blocks.*.norm1.linear": GATHERED_COLWISE,
    "transformer_blocks.*.norm1_context.linear": GATHERED_COLWISE,
    "single_transformer_blocks.*.norm.linear": GATHERED_COLWISE,
    "norm_out.linear": GATHERED_COLWISE,
}
"""diffusers' FLUX.1 tensor-parallel plan plus the AdaLN modulation (gathered colwise)."""

LONGCAT_TP_PLAN = {
    **FLUX_TP_PLAN,
    # input = cat([attention (C), MLP (4C)]): LongCat sets no packed blocks on the Linear
    "single_transformer_blocks.*.proj_out": PackedRowwiseParallel([1, 4]),
}
"""FLUX.1's tensor-parallel plan (diffusers' ``_tp_plan``) for LongCat-Image."""

OVIS_TP_PLAN = {
    **LONGCAT_TP_PLAN,
    "single_transformer_blocks.*.proj_mlp": PackedColwiseParallel([1, 1]),  # [value, gate]
    "transformer_blocks.*.ff.net.0.proj": PackedColwiseParallel([1, 1]),  # SwiGLU
    "transformer_blocks.*.ff_context.net.0.proj": PackedColwiseParallel([1, 1]),
}
"""Ovis-Image: LongCat's plan with its SwiGLU projections split per half."""


class FluxTransformer2DModel(_DiffusersFluxTransformer):
    """diffusers' FLUX.1 transformer with its sequence- and tensor-parallel plans declared."""

    _sp_plan = FLUX_SP_PLAN
    _tp_plan = FLUX_TP_PLAN


FLUX_ATTENTION = AttentionLayout(
    processor=lambda runtime, state: JointAttnProcessor(
        runtime, "FLUX", rope=flux_rope, concat_blocks="single_transformer_blocks"
    ),
    blocks={"transformer_blocks": ("attn",), "single_transformer_blocks": ("attn",)},
)
"""Every block's attention through one processor; LongCat-Image and Ovis-Image too."""


def norm1_modulated_input(block, args: dict) -> torch.Tensor:
    """``norm1(hidden_states, temb)``'s modulated image tokens: an ``AdaLayerNormZero``
    (FLUX, LongCat, Ovis, SD3) or SD3.5's ``AdaLayerNormZeroX``, both return it first."""
    return block.norm1(args["hidden_states"], emb=args["temb"])[0]


FLUX_CACHE = BlockCacheAdapter(
    blocks=("transformer_blocks", "single_transformer_blocks"),
    modulated_input=norm1_modulated_input,
    teacache_coefficients=FLUX_COEFFICIENTS,
)
"""How the blocks look to the step caches (see the module docstring)."""
