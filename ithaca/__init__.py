"""ithaca: OpenAI-compatible image and video generation across many GPUs.

``from ithaca import Omni, OmniDiffusionSamplingParams, DiffusionParallelConfig`` is the
reference system's documented offline API (:mod:`ithaca.omni`); ``ithaca.api.Ithaca`` is
ithaca's own. ``Omni`` and ``OmniDiffusionSamplingParams`` import the engine on first use.
"""

from ithaca.config import DiffusionParallelConfig, ParallelConfig

__all__ = ["DiffusionParallelConfig", "Omni", "OmniDiffusionSamplingParams", "ParallelConfig"]
__version__ = "0.1.0"

_LAZY = {"Omni", "OmniDiffusionSamplingParams"}


def __getattr__(name: str):
    if name in _LAZY:
        from ithaca import omni

        return getattr(omni, name)
    raise AttributeError(f"module 'ithaca' has no attribute {name!r}")
