"""Qwen-Image's transformer under sequence parallelism: the ``_sp_plan`` and the processor.

The math is diffusers' ``QwenImageTransformer2DModel``; this module only declares where
its sequence is split and installs the joint attention processor
(:class:`ithaca.models.attention.JointAttnProcessor`, text first, with its key mask).

Plan (``auto_pad`` everywhere a length may not divide by the sequence-parallel size):

- ``pos_embed`` output 0, the image RoPE frequencies ``(S_img, D/2, 2)`` (cos, sin: the
  real form of diffusers' complex ones, :mod:`ithaca.models.rotary`): sharded on dim 0
  with the image tokens (output 1, the text frequencies, stays whole);
- ``transformer_blocks.0`` input ``hidden_states`` ``(B, S_img, C)``: the image tokens
  (for edit: noise tokens followed by every input image's tokens) are sharded on dim 1;
  every later block receives the shard from the previous one;
- ``transformer_blocks.*`` input ``modulate_index`` ``(B, S_img)`` (only models with
  ``zero_cond_t``): sharded like the image tokens;
- ``proj_out`` output ``(B, S_img, C_out)``: gathered on dim 1 (padding trimmed).

Text tokens (``encoder_hidden_states``, its mask, the timestep embedding) are
replicated. No diffusers code is subclassed beyond declaring the plan: every tensor the
plan needs crosses a module boundary in diffusers' forward.

Step caches (:data:`QWEN_IMAGE_CACHE`): TeaCache's indicator is the first block's
timestep-modulated image input, computed exactly as the block computes it. Its
coefficients: no calibration of Qwen-Image itself has been published that we could
verify; peer systems reuse the FLUX.1 coefficients from the TeaCache paper, and so do
we unless the checkpoint's ``ithaca.json`` carries its own (``ithaca calibrate-teacache``).
"""

from __future__ import annotations

import functools

import torch
from diffusers import QwenImageTransformer2DModel as _DiffusersQwenImageTransformer

from ithaca.cache import FLUX_COEFFICIENTS, BlockCacheAdapter
from ithaca.models.attention import JointAttnProcessor, qwen_rope
from ithaca.models.rotary import use_real_freqs
from ithaca.parallel import SequenceParallelInput, SequenceParallelOutput
from ithaca.parallel.tensor import GATHERED_COLWISE
from ithaca.runtime.parallelize import AttentionLayout

QWEN_IMAGE_SP_PLAN = {
    "pos_embed": {
        0: SequenceParallelInput(split_dim=0, expected_dims=3, split_output=True, auto_pad=True),
    },
    "transformer_blocks.0": {
        "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True),
    },
    "transformer_blocks.*": {
        "modulate_index": SequenceParallelInput(split_dim=1, expected_dims=2, auto_pad=True),
    },
    "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
}

QWEN_IMAGE_TP_PLAN = {
    **_DiffusersQwenImageTransformer._tp_plan,
    # AdaLN modulation, C -> 6C per stream per block, 2C at the end: rows split, gathered
    "transformer_blocks.*.img_mod.1": GATHERED_COLWISE,
    "transformer_blocks.*.txt_mod.1": GATHERED_COLWISE,
    "norm_out.linear": GATHERED_COLWISE,
}
"""diffusers' Qwen-Image tensor-parallel plan plus the AdaLN modulation (gathered colwise)."""


class QwenImageTransformer2DModel(_DiffusersQwenImageTransformer):
    """diffusers' Qwen-Image transformer with its sequence- and tensor-parallel plans
    declared, its RoPE frequencies in the real form (compilable; the same numbers)."""

    _sp_plan = QWEN_IMAGE_SP_PLAN
    _tp_plan = QWEN_IMAGE_TP_PLAN

    @functools.wraps(_DiffusersQwenImageTransformer.__init__)  # its signature: the config
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_real_freqs(self.pos_embed)  # before the plan's hooks: they shard the real form


QWEN_IMAGE_ATTENTION = AttentionLayout(
    processor=lambda runtime, state: JointAttnProcessor(
        runtime, "Qwen-Image", rope=qwen_rope, mask_arg="encoder_hidden_states_mask"
    ),
    blocks={"transformer_blocks": ("attn",)},
)


def modulated_input(block, args: dict) -> torch.Tensor:
    """``img_norm1(hidden_states) * (1 + scale) + shift`` of the block's first half
    (``modulate_index`` honoured for ``zero_cond_t`` checkpoints)."""
    img_mod1 = block.img_mod(args["temb"]).chunk(2, dim=-1)[0]  # (B, 3*dim)
    normed = block.img_norm1(args["hidden_states"])
    return block._modulate(normed, img_mod1, args.get("modulate_index"))[0]


QWEN_IMAGE_CACHE = BlockCacheAdapter(
    blocks="transformer_blocks",
    modulated_input=modulated_input,
    teacache_coefficients=FLUX_COEFFICIENTS,
)
