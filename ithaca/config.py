"""User-facing configuration objects: defaulted, documented, validated.

Every invalid value raises ``ValueError`` naming the field and the numbers, so a
mistake on the command line or in Python reads the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be a positive integer")


@dataclass(frozen=True)
class ParallelConfig:
    """How one worker group splits a request across ranks.

    The world size is ``data_parallel_size * cfg_parallel_size * ring_degree *
    ulysses_degree``. Ranks are laid out with ``ulysses`` innermost (adjacent ranks,
    so the all-to-all stays on NVLink neighbours), then ``ring``, then ``cfg``, with
    ``dp`` outermost; see ``ithaca.parallel.state`` for the rank map.
    """

    ulysses_degree: int = 1
    """Ranks that exchange attention heads by all-to-all (DeepSpeed Ulysses)."""

    ring_degree: int = 1
    """Ranks that rotate K/V blocks peer-to-peer (Ring attention)."""

    cfg_parallel_size: int = 1
    """1, or 2 to run the positive and negative guidance branches on separate ranks."""

    data_parallel_size: int = 1
    """Independent replicas, each running whole requests on its own ranks."""

    def __post_init__(self) -> None:
        _require_positive("ulysses_degree", self.ulysses_degree)
        _require_positive("ring_degree", self.ring_degree)
        _require_positive("data_parallel_size", self.data_parallel_size)
        if self.cfg_parallel_size not in (1, 2):
            raise ValueError(f"cfg_parallel_size ({self.cfg_parallel_size!r}) must be 1 or 2")

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.cfg_parallel_size * self.sequence_parallel_size

    def validate_heads(self, num_heads: int) -> None:
        """Raise when Ulysses cannot split ``num_heads`` attention heads evenly."""
        if num_heads % self.ulysses_degree:
            valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"ulysses_degree ({self.ulysses_degree}) must divide num_attention_heads "
                f"({num_heads}); valid degrees: {valid}"
            )


# The reference system's name for the same object.
DiffusionParallelConfig = ParallelConfig
