"""Wan's video transformer under sequence parallelism: the ``_sp_plan`` and the processor.

The math is diffusers' ``WanTransformer3DModel``; this module declares where its video
token sequence (frames x height x width patches, flattened in that order) is split and
installs an attention processor that sends self-attention through
:class:`ithaca.parallel.ParallelAttention`. Cross-attention needs no communication:
every rank holds the whole text, and each query token attends to it independently.

Plan (``auto_pad`` everywhere: the token count rarely divides by the world size):

- ``rope`` outputs 0 and 1, the RoPE ``cos`` / ``sin`` ``(1, S, 1, D)``: sharded on dim 1
  with the tokens;
- ``blocks.0`` input ``hidden_states`` ``(B, S, C)``: sharded on dim 1; every later block
  receives the shard from the previous one;
- ``proj_out`` output ``(B, S, C_out)``: gathered on dim 1 (padding trimmed) before the
  unpatchify reshape;
- per-token timesteps only (``WAN_SP_PLAN_PER_TOKEN_TIMESTEPS``, Wan2.2 TI2V): the root's
  ``timestep`` input ``(B, S)`` is sharded on dim 1 like the tokens, so the per-token
  modulation ``(B, S/P, 6, C)`` and the output norm's shift/scale ``(B, S/P, C)`` line
  up with the shard. With one timestep per sample ``(B,)`` there is nothing to shard,
  and declaring the entry would make the strict runtime report a skipped spec.

Text (``encoder_hidden_states``) and the per-sample timestep embedding stay replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel as _DiffusersWanTransformer

from ithaca.models.attention import ParallelProcessor, project_out
from ithaca.parallel import SequenceParallelInput, SequenceParallelOutput
from ithaca.parallel.tensor import GATHERED_COLWISE, SPLIT_RMS_NORM
from ithaca.runtime.parallelize import AttentionLayout

WAN_SP_PLAN = {
    "rope": {
        0: SequenceParallelInput(split_dim=1, expected_dims=4, split_output=True, auto_pad=True),
        1: SequenceParallelInput(split_dim=1, expected_dims=4, split_output=True, auto_pad=True),
    },
    "blocks.0": {
        "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True),
    },
    "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
}

WAN_SP_PLAN_PER_TOKEN_TIMESTEPS = {
    **WAN_SP_PLAN,
    "": {"timestep": SequenceParallelInput(split_dim=1, expected_dims=2, auto_pad=True)},
}


def wan_tp_plan(config) -> dict:
    """Tensor-parallel plan (``ithaca.parallel.tensor``): heads of self- and
    cross-attention, the image context's keys / values where the checkpoint has them
    (``added_kv_proj_dim``), and the GELU MLP split. Wan's QK RMSNorms span all heads
    (``inner_dim``), so they are split with them and all-reduce their sums of squares.
    The timestep's ``C -> 6C`` modulation projection is split by rows and gathered."""
    attention = {"to_q": "colwise", "to_k": "colwise", "to_v": "colwise", "to_out.0": "rowwise",
                 "norm_q": SPLIT_RMS_NORM, "norm_k": SPLIT_RMS_NORM}  # fmt: skip
    attention_2 = attention
    if config.added_kv_proj_dim is not None:  # image context of cross-attention only
        attention_2 = {**attention, "add_k_proj": "colwise", "add_v_proj": "colwise",
                       "norm_added_k": SPLIT_RMS_NORM}  # fmt: skip
    plan = {f"blocks.*.attn1.{path}": style for path, style in attention.items()}
    plan |= {f"blocks.*.attn2.{path}": style for path, style in attention_2.items()}
    plan |= {"blocks.*.ffn.net.0.proj": "colwise", "blocks.*.ffn.net.2": "rowwise"}
    return plan | {"condition_embedder.time_proj": GATHERED_COLWISE}  # C -> 6C modulation


class WanTransformer3DModel(_DiffusersWanTransformer):
    """diffusers' Wan transformer with its sequence- and tensor-parallel plans declared."""

    _sp_plan = WAN_SP_PLAN
    _tp_plan = staticmethod(wan_tp_plan)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on ``(B, S, H, D)`` with ``cos`` / ``sin`` ``(1, S, 1, D)``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # even / odd channels: (B, S, H, D/2)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class ParallelWanAttnProcessor(ParallelProcessor):
    """Wan's self- and cross-attention; self-attention runs through ``ParallelAttention``.

    Same projections, QK norms (across heads) and RoPE as diffusers' ``WanAttnProcessor``.
    Self-attention sees this rank's token shard ``(B, S/P, C)``; padding added by
    ``auto_pad`` is masked by the runtime. Cross-attention attends from the shard to the
    full text with a local kernel. Wan2.1's image-embedding cross-attention
    (``add_k_proj``) is not supported: no Wan2.2 checkpoint has it. Fused projections
    (``fuse_projections``) keep ``to_q`` / ``to_k`` / ``to_v``, which this processor reads.
    """

    family = "Wan"

    def attend(self, attn, hidden_states, encoder_hidden_states, rotary_emb, mask):
        if attn.add_k_proj is not None:
            raise ValueError("Wan2.1 image cross-attention (added_kv_proj_dim) is not supported")
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        # (B, S/P, C) -> (B, S/P, H, D) queries; keys/values from the tokens or the text
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if cross:
            # (B, S/P, H, D) x (B, T, H, D) -> (B, S/P, H, D): per query, no communication
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
        else:
            cos, sin = rotary_emb  # (1, S/P, 1, D): sharded with the tokens
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            out, _ = self.runtime.attention(q, k, v)  # (B, S/P, H, D)
        return project_out(attn, out, q.dtype)  # (B, S/P, H, D) -> (B, S/P, H*D)


def wan_attention(per_token_timesteps: bool) -> AttentionLayout:
    """Self- and cross-attention of every block through the processor; TI2V-5B's
    per-token timesteps are sharded with the tokens."""
    return AttentionLayout(
        processor=lambda runtime, state: ParallelWanAttnProcessor(runtime),
        blocks={"blocks": ("attn1", "attn2")},
        plan=WAN_SP_PLAN_PER_TOKEN_TIMESTEPS if per_token_timesteps else WAN_SP_PLAN,
    )
