"""What a served model can do, read from its checkpoint's ``model_index.json`` (no weights).

The server routes by task (``image`` or ``video``), tells users which words of a prompt
a model never learned (``_ithaca_vocabulary``, written by ``tools/`` for the default
models) and describes each model on ``/v1/models/{id}``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field

VIDEO_CLASSES = frozenset({"WanPipeline", "WanImageToVideoPipeline"})
TASKS = ("image", "video")

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ModelInfo:
    """The facts the front process needs about one served model."""

    path: str | None
    """Checkpoint directory / hub id, ``None`` for a pipeline factory (``module:attr``)."""
    class_name: str | None
    tasks: tuple[str, ...]
    """Routes it can serve: ``("image",)``, ``("video",)``, or both for a factory."""
    vocabulary: frozenset[str] | None = None
    """Every word it was trained on (lower case), ``None`` when the checkpoint does not say."""
    defaults: dict = field(default_factory=dict)
    """``_ithaca_defaults``: the size / steps / frames it was trained and measured at."""

    def unknown_words(self, prompt: str | None) -> list[str]:
        """The words of ``prompt`` outside the vocabulary, in order; [] without one."""
        if self.vocabulary is None or not prompt:
            return []
        seen: dict[str, None] = {}
        for word in _WORD.findall(prompt.lower()):
            if word not in self.vocabulary:
                seen.setdefault(word)
        return list(seen)

    def card(self) -> dict:
        """The ``/v1/models/{id}`` extension: what it does and what it can draw."""
        out: dict = {"tasks": list(self.tasks), "pipeline": self.class_name}
        if self.defaults:
            out["defaults"] = self.defaults
        if self.vocabulary is not None:
            out["vocabulary"] = sorted(self.vocabulary)
            motion = ", moving, changing colour or growing" if "video" in self.tasks else ""
            out["description"] = (
                "Trained only on prompts made of the listed words: flat circles, squares and "
                "triangles in named colours and sizes at positions of a 3x3 grid on a plain "
                f"background{motion}. Other words are ignored (the response says which)."
            )
        return out


def model_info(model: str) -> ModelInfo:
    """Read ``model``'s index; a ``module:attr`` pipeline factory may serve either task."""
    from ithaca.models.registry import model_index

    if ":" in model and not os.path.exists(model):
        return ModelInfo(None, None, TASKS)
    try:
        index = model_index(model)
    except Exception:
        from ithaca.models.bagel.loader import is_bagel_checkpoint

        if is_bagel_checkpoint(model):  # no model_index.json: recognised by its files
            return ModelInfo(path=model, class_name="Bagel", tasks=("image",))
        raise
    name = index.get("_class_name")
    words = index.get("_ithaca_vocabulary")
    return ModelInfo(
        path=model,
        class_name=name,
        tasks=("video",) if name in VIDEO_CLASSES else ("image",),
        vocabulary=frozenset(words) if words is not None else None,
        defaults=dict(index.get("_ithaca_defaults") or {}),
    )


def default_models() -> list[str]:
    """What ``ithaca serve`` with no model serves: the default image model, then the default
    video model when the package ships it."""
    from ithaca.models.shapes import shipped_checkpoint_path, shipped_video_checkpoint_path

    models = [shipped_checkpoint_path()]
    with contextlib.suppress(FileNotFoundError):
        models.append(shipped_video_checkpoint_path())
    return models
