"""The embedded default model: a tiny Qwen-Image trained on procedural shape scenes.

``shipped_checkpoint_path()`` is a ``QwenImagePipeline`` directory inside the package
(fp16 safetensors, a few MB) that loads through the normal registry like any Qwen-Image
checkpoint. See ``docs/default-model.md`` for how it was trained and how well it follows
prompts; ``python -m tools.shapes.train`` reproduces it and
``python -m tools.shapes.evaluate`` measures it.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"


def shipped_checkpoint_path() -> str:
    """The shipped checkpoint directory; ``FileNotFoundError`` if the package lacks it."""
    if not (CHECKPOINT_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{CHECKPOINT_DIR} has no model_index.json: the shapes checkpoint is missing "
            "from this install (package data)"
        )
    return str(CHECKPOINT_DIR)
