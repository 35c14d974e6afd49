"""How a family's transformer is parallelized: the layout it declares, applied from outside.

A family declares an :class:`AttentionLayout` (its processor, the block lists it goes
on, the ``_sp_plan``); :func:`parallelize` splits the weights by the transformer's
``_tp_plan``, installs the sequence-parallel hooks and routes the declared attention
modules through the processor. Nothing here knows a family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ithaca.parallel import ParallelState, SequenceParallelRuntime, apply_sequence_parallel
from ithaca.parallel.tensor import apply_tensor_parallel


@dataclass(frozen=True)
class AttentionLayout:
    """How a transformer runs under sequence parallelism.

    ``processor(runtime)`` is installed on the attention modules named in ``blocks``
    (``{"transformer_blocks": ("attn",)}``: every block of that list, those attributes;
    a None attribute is skipped). A processor may define ``attach(block, name, blocks)``
    to do more than ``set_processor`` (FLUX's single-stream blocks record their text
    length).
    ``plan`` is the ``_sp_plan``, or a function of the transformer's config.
    """

    processor: Callable[[SequenceParallelRuntime, ParallelState], Any]
    blocks: Mapping[str, tuple[str, ...]]
    plan: Mapping | Callable[[Any], Mapping] | None = None
    check_heads: bool = True
    """Whether the Ulysses degree must divide the head count (False: the processor pads
    heads)."""


def parallelize(
    transformer: torch.nn.Module, state: ParallelState, layout: AttentionLayout
) -> SequenceParallelRuntime:
    """Split the weights by the transformer's ``_tp_plan`` over ``state.tp`` (if its size is
    above 1), apply ``layout``'s sequence-parallel plan for ``state`` and route the
    declared blocks through it."""
    transformer._ithaca_tp = apply_tensor_parallel(transformer, state, type(transformer).__name__)
    if layout.check_heads:  # Ulysses splits the heads one tensor-parallel rank holds
        state.config.validate_heads(transformer.config.num_attention_heads // state.tp.size)
    plan = layout.plan if layout.plan is not None else transformer._sp_plan
    if callable(plan):
        plan = plan(transformer.config)
    runtime = apply_sequence_parallel(transformer, plan, state)
    processor = layout.processor(runtime, state)
    for blocks, names in layout.blocks.items():
        for block in getattr(transformer, blocks):
            for name in names:
                if getattr(block, name, None) is None:
                    continue
                if hasattr(processor, "attach"):
                    processor.attach(block, name, blocks)
                else:
                    getattr(block, name).set_processor(processor)
    return runtime
