"""ithaca: OpenAI-compatible image and video generation across many GPUs."""

from ithaca.config import DiffusionParallelConfig, ParallelConfig

__all__ = ["DiffusionParallelConfig", "ParallelConfig"]
__version__ = "0.1.0"
