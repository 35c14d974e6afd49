"""The reference system's ``SequenceParallelConfig``: a Ulysses x Ring layout set up on the
running process group, applied to a model's ``_sp_plan``. Above ``state``, ``attention`` and
``hooks`` (it builds on all three), so none of them imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ithaca.config import ParallelConfig
from ithaca.parallel.attention import ParallelAttention
from ithaca.parallel.hooks import apply_sequence_parallel
from ithaca.parallel.sharding import set_setup_state
from ithaca.parallel.state import ParallelState


@dataclass
class SequenceParallelConfig:
    """The reference API's sequence-parallel view over a :class:`ParallelState`.

    ``setup`` attaches it to a state (given, or built from the torchrun environment
    with ``ulysses_degree * ring_degree`` sequence-parallel ranks per replica) and makes
    that state ambient for ``ithaca.parallel.sharding``'s state-less helpers; ``apply``
    installs a model's ``_sp_plan`` with this config's ``convert_to_fp32``.
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    convert_to_fp32: bool = True
    """Merge ring partial outputs and log-sum-exp in float32."""
    _state: ParallelState | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        ParallelConfig(ulysses_degree=self.ulysses_degree, ring_degree=self.ring_degree)

    def setup(
        self,
        rank: int,
        world_size: int,
        device: torch.device | str,
        state: ParallelState | None = None,
    ) -> None:
        sp = self.ulysses_degree * self.ring_degree
        if state is None:
            if world_size % sp:
                raise ValueError(
                    f"world_size ({world_size}) must be a multiple of ulysses_degree * "
                    f"ring_degree ({sp})"
                )
            config = ParallelConfig(
                ulysses_degree=self.ulysses_degree,
                ring_degree=self.ring_degree,
                data_parallel_size=world_size // sp,
            )
            state = ParallelState.build(config, device)
        if state.rank != rank or state.world_size != world_size:
            raise ValueError(
                f"setup(rank={rank}, world_size={world_size}) does not match the process "
                f"group (rank {state.rank} of {state.world_size})"
            )
        if (state.ulysses.size, state.ring.size) != (self.ulysses_degree, self.ring_degree):
            raise ValueError(
                f"state has ulysses={state.ulysses.size} ring={state.ring.size}, config asks "
                f"for ulysses={self.ulysses_degree} ring={self.ring_degree}"
            )
        self._state = state
        set_setup_state(state)

    def apply(self, model, plan=None, strict: bool = True):
        """``apply_sequence_parallel`` over this config's state; ring partial outputs and
        log-sum-exp merge in float32 only when ``convert_to_fp32``."""
        runtime = apply_sequence_parallel(model, plan, self.state, strict)
        runtime.attention = ParallelAttention(self.state, runtime, self.convert_to_fp32)
        return runtime

    def is_initialized(self) -> bool:
        return self._state is not None

    @property
    def state(self) -> ParallelState:
        if self._state is None:
            raise RuntimeError("SequenceParallelConfig.setup() has not been called")
        return self._state

    def get_rank(self) -> int:
        return self.state.sp.rank

    def get_world_size(self) -> int:
        return self.state.sp.size

    def get_ulysses_rank(self) -> int:
        return self.state.ulysses.rank

    def get_ulysses_world_size(self) -> int:
        return self.state.ulysses.size

    def get_ring_rank(self) -> int:
        return self.state.ring.rank

    def get_ring_world_size(self) -> int:
        return self.state.ring.size
