"""The embedded default model: a tiny Qwen-Image trained on procedural shape scenes.

``shipped_checkpoint_path()`` is a ``QwenImagePipeline`` directory inside the package
(fp16 safetensors, a few MB) that loads through the normal registry like any Qwen-Image
checkpoint; ``shipped_video_checkpoint_path()`` the same for the default video model
(a tiny ``WanPipeline``). See ``docs/default-model.md`` for how they were trained and how
well they follow prompts; ``python -m tools.shapes.train`` / ``tools.video.train``
reproduce them and ``python -m tools.shapes.evaluate`` / ``tools.video.evaluate``
measure them.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
VIDEO_CHECKPOINT_DIR = Path(__file__).parent / "video_checkpoint"


def shipped_checkpoint_path(directory: Path = CHECKPOINT_DIR) -> str:
    """The shipped checkpoint directory; ``FileNotFoundError`` if the package lacks it."""
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no model_index.json: the shapes checkpoint is missing "
            "from this install (package data)"
        )
    return str(directory)


def shipped_video_checkpoint_path() -> str:
    """The default video model: a ``WanPipeline`` directory trained on shape clips
    (``tools/video``, ``docs/default-model.md``)."""
    return shipped_checkpoint_path(VIDEO_CHECKPOINT_DIR)
