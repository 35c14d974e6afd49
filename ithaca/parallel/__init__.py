"""Splitting one diffusion-transformer forward across ranks.

- :mod:`state`: the process-group layout (:class:`ParallelState`) and rank map;
- :mod:`comm`: collectives with shape comments and byte counts;
- :mod:`kernels`: local attention returning log-sum-exp, partial merging;
- :mod:`attention`: the entry point for attention processors (local / Ulysses /
  Ring / hybrid, joint text, key masks, auto_pad masking);
- :mod:`sp_plan`, :mod:`hooks`, :mod:`sharding`: declarative ``_sp_plan`` sharding;
- :mod:`cfg`: CFG-parallel;
- :mod:`hsdp`: weights sharded over a replica's ranks (FSDP2 ``fully_shard``).
"""

from ithaca.parallel.attention import ParallelAttention
from ithaca.parallel.cfg import apply_guidance, idle_branch_warning, predict_branches
from ithaca.parallel.hooks import SequenceParallelRuntime, apply_sequence_parallel
from ithaca.parallel.sharding import (
    ShardingValidator,
    sp_gather,
    sp_shard,
    sp_shard_with_padding,
)
from ithaca.parallel.sp_config import SequenceParallelConfig
from ithaca.parallel.sp_plan import (
    SequenceParallelInput,
    SequenceParallelModelPlan,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    get_sp_plan_from_model,
    validate_sp_plan,
)
from ithaca.parallel.state import ParallelState

# :mod:`hsdp` imports FSDP2 and DTensor (about 4 s of CPU per process, ~40% of a worker's
# import time): loaded on first use, so processes that never shard weights (front ends,
# the test suite's pipeline double) do not pay for it.
_HSDP = (
    "HSDPInferenceConfig",
    "apply_hsdp_to_model",
    "get_fully_shard_rank",
    "get_fully_shard_world_size",
    "parameter_bytes",
)


def __getattr__(name: str):
    if name in _HSDP:
        from ithaca.parallel import hsdp

        return getattr(hsdp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HSDPInferenceConfig",
    "ParallelAttention",
    "ParallelState",
    "SequenceParallelConfig",
    "SequenceParallelInput",
    "SequenceParallelModelPlan",
    "SequenceParallelOutput",
    "SequenceParallelPartialInput",
    "SequenceParallelRuntime",
    "ShardingValidator",
    "apply_guidance",
    "apply_hsdp_to_model",
    "apply_sequence_parallel",
    "get_fully_shard_rank",
    "get_fully_shard_world_size",
    "get_sp_plan_from_model",
    "idle_branch_warning",
    "parameter_bytes",
    "predict_branches",
    "sp_gather",
    "sp_shard",
    "sp_shard_with_padding",
    "validate_sp_plan",
]
