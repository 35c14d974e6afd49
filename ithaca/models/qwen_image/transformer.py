"""Qwen-Image's transformer under sequence parallelism: the ``_sp_plan`` and the processor.

The math is diffusers' ``QwenImageTransformer2DModel``; this module only declares where
its sequence is split and installs an attention processor that sends the joint
text+image attention through :class:`ithaca.parallel.ParallelAttention`.

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
"""

from __future__ import annotations

import functools

import torch
from diffusers import QwenImageTransformer2DModel as _DiffusersQwenImageTransformer

from ithaca.models.attention import TEXT, ParallelProcessor, project, project_out
from ithaca.models.rotary import apply_rope, use_real_freqs
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


class ParallelJointAttnProcessor(ParallelProcessor):
    """Qwen-Image's double-stream joint attention, routed through ``ParallelAttention``.

    Same projections, QK norms and RoPE as diffusers' ``QwenDoubleStreamAttnProcessor2_0``;
    the attention itself runs on this rank's image shard and the whole text.
    """

    family = "Qwen-Image"
    mask_arg = "encoder_hidden_states_mask"

    def attend(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb, mask):
        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image joint attention needs encoder_hidden_states")
        encoder_hidden_states_mask = mask
        # (B, S/P, C) -> (B, S/P, H, D) image; (B, T, C) -> (B, T, H, D) text
        img_q, img_k, img_v = project(attn, hidden_states)
        txt_q, txt_k, txt_v = project(attn, encoder_hidden_states, TEXT)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb  # (S/P, D/2, 2) sharded, (T, D/2, 2) whole
            img_q, img_k = apply_rope(img_q, img_freqs), apply_rope(img_k, img_freqs)
            txt_q, txt_k = apply_rope(txt_q, txt_freqs), apply_rope(txt_k, txt_freqs)
        text_mask = None
        if encoder_hidden_states_mask is not None:
            text_mask = encoder_hidden_states_mask.to(torch.bool)  # (B, T), True = attend
        # Joint sequence [text, image], as in diffusers: joint_strategy="front".
        img_out, txt_out = self.runtime.attention(
            img_q, img_k, img_v,
            joint_q=txt_q, joint_k=txt_k, joint_v=txt_v,
            joint_mask=text_mask, joint_strategy="front",
        )  # fmt: skip
        # (B, T, H, D) -> (B, T, H*D)
        txt_out = attn.to_add_out(txt_out.flatten(2, 3).to(txt_q.dtype).contiguous())
        return project_out(attn, img_out, img_q.dtype), txt_out


QWEN_IMAGE_ATTENTION = AttentionLayout(
    processor=lambda runtime, state: ParallelJointAttnProcessor(runtime),
    blocks={"transformer_blocks": ("attn",)},
    plan=QWEN_IMAGE_SP_PLAN,
)
