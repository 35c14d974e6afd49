"""Ovis-Image's transformer under sequence parallelism.

diffusers' ``OvisImageTransformer2DModel`` has FLUX.1's layout (double-stream blocks,
then single-stream blocks that concatenate ``[text, image]`` inside their forward, RoPE
over ``cat(txt_ids, img_ids)``, the same attention module attributes), so it takes
FLUX's plan and processor unchanged: see :mod:`ithaca.models.flux.transformer`.
"""

from __future__ import annotations

import torch
from diffusers import OvisImageTransformer2DModel as _DiffusersOvisImageTransformer

from ithaca.models.flux.transformer import FLUX_SP_PLAN, FluxParallelAttnProcessor
from ithaca.parallel import ParallelState, SequenceParallelRuntime, apply_sequence_parallel

OVIS_IMAGE_SP_PLAN = FLUX_SP_PLAN


class OvisImageTransformer2DModel(_DiffusersOvisImageTransformer):
    """diffusers' Ovis-Image transformer with its sequence-parallel plan declared."""

    _sp_plan = OVIS_IMAGE_SP_PLAN


def parallelize(transformer: torch.nn.Module, state: ParallelState) -> SequenceParallelRuntime:
    """Apply the plan for ``state`` and route every block's attention through it."""
    state.config.validate_heads(transformer.config.num_attention_heads)
    runtime = apply_sequence_parallel(transformer, OVIS_IMAGE_SP_PLAN, state)
    processor = FluxParallelAttnProcessor(runtime)
    for block in transformer.transformer_blocks:
        block.attn.set_processor(processor)
    processor.watch_single_blocks(transformer.single_transformer_blocks)
    return runtime
