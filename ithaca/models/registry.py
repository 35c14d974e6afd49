"""Checkpoint -> pipeline: ``model_index.json``'s ``_class_name`` selects our class.

``load_pipeline`` takes a hub name (``Qwen/Qwen-Image``) or a local diffusers directory;
with ``HF_HUB_OFFLINE=1`` a local directory loads without any network access.
Importing it loads no torch: the server's front process reads checkpoints' indexes here.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from ithaca.config import CacheConfig
from ithaca.types import Pipeline

if TYPE_CHECKING:
    import torch

    from ithaca.parallel import ParallelState

_BUILTIN = {
    "ithaca.models.qwen_image.pipeline": (
        "QwenImagePipeline",
        "QwenImageEditPipeline",
        "QwenImageEditPlusPipeline",
    ),
    "ithaca.models.qwen_image.layered": ("QwenImageLayeredPipeline",),
    "ithaca.models.flux.pipeline": ("FluxPipeline",),
    "ithaca.models.z_image.pipeline": ("ZImagePipeline",),
    "ithaca.models.sd3.pipeline": ("StableDiffusion3Pipeline",),
    "ithaca.models.longcat_image.pipeline": ("LongCatImagePipeline", "LongCatImageEditPipeline"),
    "ithaca.models.ovis_image.pipeline": ("OvisImagePipeline",),
    "ithaca.models.wan.pipeline": ("WanPipeline", "WanImageToVideoPipeline"),
}
"""module -> the classes it defines, each named as the diffusers ``_class_name`` it serves."""
PIPELINES: dict[str, tuple[str, str]] = {
    name: (module, name) for module, names in _BUILTIN.items() for name in names
}
"""_class_name -> (module, class): imported lazily so that the registry stays cheap."""


def model_index(model: str) -> dict:
    """A checkpoint's ``model_index.json`` (local directory or hub)."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        if not os.path.isfile(path):
            raise ValueError(f"{model} is a directory without model_index.json")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, "model_index.json")
    with open(path) as f:
        return json.load(f)


def register(class_name: str, pipeline: type | str) -> None:
    """Serve checkpoints whose ``model_index.json`` says ``_class_name == class_name``
    with ``pipeline`` (a class, or ``"module:Class"`` imported on first use)."""
    if isinstance(pipeline, type):
        pipeline = f"{pipeline.__module__}:{pipeline.__qualname__}"
    module, _, name = pipeline.partition(":")
    PIPELINES[class_name] = (module, name)


def pipeline_class(model: str) -> type:
    """The pipeline class for a checkpoint, or ``ValueError`` naming the supported ones."""
    import importlib

    try:
        class_name = model_index(model).get("_class_name")
    except Exception:
        from ithaca.models.bagel.loader import is_bagel_checkpoint

        if not is_bagel_checkpoint(model):  # Bagel: no model_index.json, recognised by files
            raise
        from ithaca.models.bagel.pipeline import BagelPipeline

        return BagelPipeline
    if class_name not in PIPELINES:
        raise ValueError(
            f"{model}: pipeline class {class_name!r} is not supported; supported classes: "
            f"{sorted(PIPELINES)}"
        )
    module, name = PIPELINES[class_name]
    return getattr(importlib.import_module(module), name)


def default_dtype(device: torch.device) -> torch.dtype:
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_pipeline(
    model: str,
    state: ParallelState,
    dtype: torch.dtype | None = None,
    cache_backend: str | None = None,
    cache_config: dict | None = None,
) -> Pipeline:
    """Load ``model`` on this rank for ``state``. Collective over the replica only in use.

    ``dtype`` defaults to bf16 on CUDA and fp32 on CPU. ``cache_backend`` and
    ``cache_config`` set the pipeline's default step cache (``"tea_cache"`` or
    ``"cache_dit"``; see ``ithaca.cache``); a request may override them.

    The returned pipeline exposes ``default_width``, ``default_height`` and
    ``default_steps`` for the server to report.
    """
    cache = CacheConfig.from_dict(cache_backend, cache_config)  # before loading any weights
    cls = pipeline_class(model)
    pipeline = cls(model, state, dtype or default_dtype(state.device))
    transformers = getattr(pipeline, "experts", None) or [getattr(pipeline, "transformer", None)]
    if state.tp.size > 1 and any(getattr(t, "_ithaca_tp", None) is None for t in transformers):
        raise ValueError(
            f"tensor_parallel_size ({state.tp.size}): {cls.__name__} does not split its "
            f"weights; serve it with --tensor-parallel-size 1"
        )
    pipeline.configure_cache(cache)
    return pipeline
