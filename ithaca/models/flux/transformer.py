"""FLUX.1's transformer under sequence parallelism: the ``_sp_plan`` and the processor.

The math is diffusers' ``FluxTransformer2DModel``; this module declares where its
sequence is split and installs one attention processor, for both kinds of block, that
sends the joint text+image attention through :class:`ithaca.parallel.ParallelAttention`.

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
"""

from __future__ import annotations

import inspect

import torch
from diffusers import FluxTransformer2DModel as _DiffusersFluxTransformer
from diffusers.hooks.tensor_parallel import PackedColwiseParallel, PackedRowwiseParallel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ithaca.models.attention import ParallelProcessor, project_out
from ithaca.parallel import (
    SequenceParallelInput,
    SequenceParallelOutput,
    SequenceParallelRuntime,
)
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


class FluxParallelAttnProcessor(ParallelProcessor):
    """FLUX joint attention (double- and single-stream) routed through ``ParallelAttention``.

    Same projections, QK norms and RoPE as diffusers' ``FluxAttnProcessor``; the
    attention runs over this rank's image shard and the whole text, text first.
    """

    def __init__(self, runtime: SequenceParallelRuntime):
        super().__init__(runtime)
        self._text_len: int | None = None

    def attach(self, block: torch.nn.Module, name: str, blocks: str) -> None:
        """Route ``block``'s attention through this processor.

        A single-stream block (of ``single_transformer_blocks``: its forward takes
        ``encoder_hidden_states``, its attention does not get it) also gets a pre-hook
        that records its text length before it concatenates ``[text, image]``; the
        processor splits at it. Blocks run one at a time, so the recorded length is
        always the running block's.
        """
        getattr(block, name).set_processor(self)
        if blocks != "single_transformer_blocks":  # double-stream: text comes separately
            return
        signature = inspect.signature(block.forward)

        def record(module, args, kwargs):
            text = signature.bind_partial(*args, **kwargs).arguments["encoder_hidden_states"]
            self._text_len = text.shape[1]  # (B, T, C)

        self.runtime.track(block.register_forward_pre_hook(record, with_kwargs=True))

    family = "FLUX"

    def attend(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb, mask):
        single = encoder_hidden_states is None
        if single and self._text_len is None:
            raise ValueError(
                "single-stream blocks must be registered with attach() so that "
                "the processor knows where [text, image] splits"
            )
        q, k, v, txt_q, txt_k, txt_v = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        # (B, L, H*D) -> (B, L, H, D)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if single:
            # (B, T + S/P, H, D) -> text (B, T, H, D) and image (B, S/P, H, D)
            t = self._text_len
            (txt_q, q), (txt_k, k), (txt_v, v) = (
                x.split([t, x.shape[1] - t], 1) for x in (q, k, v)
            )
        else:
            t = encoder_hidden_states.shape[1]
            txt_q, txt_k, txt_v = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (txt_q, txt_k, txt_v)
            )
            txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            # (T + S/P, D) cos and sin: the text rows first, then this rank's image rows
            cos, sin = image_rotary_emb
            txt_rope, img_rope = (cos[:t], sin[:t]), (cos[t:], sin[t:])
            q, k = (apply_rotary_emb(x, img_rope, sequence_dim=1) for x in (q, k))
            txt_q, txt_k = (apply_rotary_emb(x, txt_rope, sequence_dim=1) for x in (txt_q, txt_k))

        img_out, txt_out = self.runtime.attention(
            q, k, v, joint_q=txt_q, joint_k=txt_k, joint_v=txt_v, joint_strategy="front"
        )
        # (B, T, H, D) -> (B, T, H*D)
        txt_out = txt_out.flatten(2, 3).to(q.dtype)
        if single:  # (B, T + S/P, H*D), no out projection
            return torch.cat([txt_out, img_out.flatten(2, 3).to(q.dtype)], dim=1)
        return project_out(attn, img_out, q.dtype), attn.to_add_out(txt_out.contiguous())


FLUX_ATTENTION = AttentionLayout(
    processor=lambda runtime, state: FluxParallelAttnProcessor(runtime),
    blocks={"transformer_blocks": ("attn",), "single_transformer_blocks": ("attn",)},
    plan=FLUX_SP_PLAN,
)
"""Every block's attention through one processor; LongCat-Image and Ovis-Image too."""
