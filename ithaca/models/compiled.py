"""``--compile``: regional compilation of the repeated transformer blocks.

Each block class is compiled once (``torch.compile`` of every block's ``forward``: the
blocks of a stack share the code object, and dynamo treats their parameters as inputs,
so one graph serves all of them) rather than the whole transformer, which keeps the
cold start to one graph per block class. What stays eager, outside the graph:

- the module hooks (sequence-parallel sharding and gathering, LoRA rebinding): the
  compiled ``forward`` is what the hooks wrap;
- step caches: they wrap the compiled ``forward`` of each block and decide in eager
  code (their decision is an all-reduce);
- every collective: on a multi-rank layout the parallel attention call (all-to-all,
  ring p2p) runs eagerly between two graphs (``torch.compiler.disable``); on one rank
  it is a plain local kernel and compiles with the block.

Compiled artefacts go to ``cache_dir`` (inductor's FX graph and autograd caches), so a
restarted server or worker group loads them instead of compiling again. Warm-up runs
the served sizes at batch 1 and 2 (the second marks the batch dimension dynamic, so a
fused batch of any size reuses one graph) before the server reports ready.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

from ithaca.types import GenerationParams

logger = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_cache_dir(path: str) -> None:
    """Keep inductor's compiled artefacts in ``path`` (0700): a restart reuses them.
    Set before the first compilation of the process."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    os.environ[CACHE_ENV] = path


def repeated_blocks(transformer: nn.Module, stacks=()) -> list[nn.Module]:
    """The blocks to compile: diffusers' ``_repeated_blocks`` classes, else the modules
    of the ``stacks`` (names of ``nn.ModuleList`` attributes)."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = [b for name in stacks for b in getattr(transformer, name, ())]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} declares no repeated blocks to compile")
    return blocks


def compile_transformer(transformer: nn.Module, runtime, state, stacks=(), **options) -> int:
    """Compile ``transformer``'s repeated blocks in place; returns how many.

    ``runtime``: its :class:`SequenceParallelRuntime`; on a multi-rank layout its
    attention (which calls the collectives) is kept out of the graphs.
    """
    if runtime is not None and state.sp.size > 1 and not hasattr(runtime, "_eager_attention"):
        runtime._eager_attention = runtime.attention
        runtime.attention = torch.compiler.disable(_EagerCall(runtime._eager_attention))
    blocks = repeated_blocks(transformer, stacks)
    for block in blocks:
        # An instance attribute, as step caches install theirs: hooks stay outside.
        block.forward = torch.compile(block.forward, **options)
    return len(blocks)


class _EagerCall:
    """A plain function face for a callable object (what ``torch.compiler.disable`` wraps)."""

    def __init__(self, call):
        self.call = call

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def compile_pipeline(pipeline, **options) -> int:
    """Compile every transformer of ``pipeline`` (Wan2.2: both experts). A family whose
    blocks do not compile to a bounded set of graphs says why in ``compile_refusal``,
    and ``--compile`` is refused at start-up with that reason (ValueError)."""
    refusal = getattr(pipeline, "compile_refusal", None)
    if refusal:
        raise ValueError(f"compile (--compile) is not supported for {refusal}")
    runtimes = getattr(pipeline, "runtimes", None) or [getattr(pipeline, "runtime", None)]
    transformers = list(pipeline.lora_targets().values())
    layout = getattr(getattr(pipeline, "spec", None), "attention", None)
    if layout is not None:
        stacks = tuple(layout.blocks)
    else:  # a family without a spec (Bagel): the stacks its step caches wrap
        blocks = pipeline.cache_adapter().blocks
        stacks = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    return sum(
        compile_transformer(t, r, pipeline.state, stacks, **options)
        for t, r in zip(transformers, runtimes, strict=True)
    )


def warm_up(pipeline, sizes: list[tuple[int, int]] | None = None) -> float:
    """Run each served size once at batch 1 and once at batch 2 (2 steps), so serving
    compiles nothing. Every rank of the group calls this, in the same order. Returns the
    seconds it took (the cold start, or the cache load after a restart)."""
    started = time.perf_counter()
    sizes = sizes or [(pipeline.default_width, pipeline.default_height)]
    for width, height in sizes:
        for n in (1, 2):
            batch = [
                GenerationParams(
                    prompt="warm-up", width=width, height=height, num_inference_steps=2, seed=i
                )
                for i in range(n)
            ]
            pipeline.generate(batch)
    seconds = time.perf_counter() - started
    logger.info("compiled blocks warmed up for %s in %.1f s", sizes, seconds)
    return seconds
