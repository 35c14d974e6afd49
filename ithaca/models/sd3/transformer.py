"""SD3 / SD3.5's transformer under sequence parallelism: the ``_sp_plan`` and the processor.

The math is diffusers' ``SD3Transformer2DModel`` (MMDiT ``JointTransformerBlock`` s);
this module declares where its sequence is split and installs the joint attention
processor (:class:`ithaca.models.attention.JointAttnProcessor`, text last) on the joint
attention and SD3.5's image-only second attention.

Plan (``auto_pad`` where the image length may not divide by the sequence-parallel size):

- ``transformer_blocks.0`` input ``hidden_states`` ``(B, S_img, C)``: the patch tokens
  after ``pos_embed`` (which adds the position embedding while the image is whole),
  sharded on dim 1; every later block receives the shard from the previous one;
- ``proj_out`` output ``(B, S_img, p*p*C_out)``: gathered on dim 1 (padding trimmed),
  before the forward's own unpatchify.

Text tokens stay replicated. The joint sequence is ``[image, text]`` (text last,
``joint_strategy="rear"``), as in diffusers' ``JointAttnProcessor2_0``. There is no
RoPE and no mask: the processor needs nothing beyond its inputs.
"""

from __future__ import annotations

from diffusers import SD3Transformer2DModel as _DiffusersSD3Transformer

from ithaca.models.attention import JointAttnProcessor
from ithaca.parallel import SequenceParallelInput, SequenceParallelOutput
from ithaca.parallel.tensor import GATHERED_COLWISE
from ithaca.runtime.parallelize import AttentionLayout

SD3_SP_PLAN = {
    "transformer_blocks.0": {
        "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True),
    },
    "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
}


def sd3_tp_plan(config) -> dict:
    """Tensor-parallel plan (``ithaca.parallel.tensor``), block by block: the joint
    attention's image and text projections and both streams' GELU MLPs, SD3.5's second
    (image-only) attention where ``dual_attention_layers`` has it; the last block is
    context-pre-only (no ``to_add_out``, no text MLP). QK norms are per head: whole. The
    AdaLN modulation (``C -> 6C`` / ``9C`` per stream, ``2C`` for the last block's text and
    the output norm) is split by rows and gathered whole."""
    image = {"attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise",
             "attn.to_out.0": "rowwise", "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
             "attn.add_q_proj": "colwise", "attn.add_k_proj": "colwise",
             "attn.add_v_proj": "colwise"}  # fmt: skip
    image |= {"norm1.linear": GATHERED_COLWISE, "norm1_context.linear": GATHERED_COLWISE}
    context = {"attn.to_add_out": "rowwise", "ff_context.net.0.proj": "colwise",
               "ff_context.net.2": "rowwise"}  # fmt: skip
    dual = {"attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise",
            "attn2.to_out.0": "rowwise"}  # fmt: skip
    plan = {"norm_out.linear": GATHERED_COLWISE}  # AdaLN modulation: rows split, gathered
    for i in range(config.num_layers):
        block = dict(image)
        if i < config.num_layers - 1:  # diffusers: context_pre_only=i == num_layers - 1
            block |= context
        if i in (config.dual_attention_layers or ()):
            block |= dual
        plan |= {f"transformer_blocks.{i}.{path}": style for path, style in block.items()}
    return plan


class SD3Transformer2DModel(_DiffusersSD3Transformer):
    """diffusers' SD3 transformer with its sequence- and tensor-parallel plans declared."""

    _sp_plan = SD3_SP_PLAN
    _tp_plan = staticmethod(sd3_tp_plan)


SD3_ATTENTION = AttentionLayout(
    processor=lambda runtime, state: JointAttnProcessor(runtime, "SD3", text_first=False),
    blocks={"transformer_blocks": ("attn", "attn2")},  # attn2: SD3.5's dual attention
)
