"""Plain request and result types: the only objects that cross process boundaries.

The HTTP edge converts its pydantic models into :class:`GenerationParams`
(``to_params()``); the engine hands batches of them to a pipeline on every rank and
gets :class:`GenerationResult` objects back from the returning rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image


def open_image(path) -> Image.Image:
    """An image file decoded now and closed. A lazily opened file decodes itself when first
    pickled, and two threads pickling it at once (one queue feeder per rank) race inside
    PIL's decoder, so requests built from paths carry decoded images."""
    with Image.open(path) as image:
        image.load()
    return image


@dataclass(frozen=True)
class LoraRef:
    """One LoRA adapter a request applies (the ``lora`` request field)."""

    name: str
    scale: float | None = None
    """None: the scale the adapter was loaded with."""
    expert: str | None = None
    """Two-expert video models: ``"high_noise"`` or ``"low_noise"``; None: every expert."""


@dataclass
class GenerationParams:
    """One request's sampling parameters. ``None`` means "the model's default"."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    """Embedded guidance (guidance-distilled models) or the second expert's scale."""
    true_cfg_scale: float | None = None
    """Classifier-free guidance scale with a negative branch (Qwen-Image semantics)."""
    seed: int | None = None
    num_images: int = 1
    images: list[Image.Image] = field(default_factory=list)
    """Input images for edit pipelines, or the first frame for image-to-video."""
    layers: int | None = None
    """Output layers per image (layered decomposition, e.g. Qwen-Image-Layered): a
    request returns ``num_images * layers`` RGBA images, image-major."""
    # video
    num_frames: int | None = None
    fps: int | None = None
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    # acceleration, per request
    cache_backend: str | None = None
    cache_config: dict[str, Any] | None = None
    partial_images: int = 0
    """Number of intermediate previews to report through the step callback."""
    lora: tuple[LoraRef, ...] = ()
    """LoRA adapters applied together (stacked), by name; empty: the base model."""
    checkpoint: str | None = None
    """Server-set (video jobs): the loop saves its state to this file every
    ``checkpoint_every`` steps and resumes from it (:mod:`ithaca.runtime.checkpoint`)."""
    checkpoint_every: int = 5
    model_options: dict[str, Any] = field(default_factory=dict)
    """Family-specific sampling settings sent as extension fields (Bagel's
    ``cfg_text_scale``, ``cfg_interval``, ...); the family validates them."""
    request_id: str = ""

    def check(self) -> None:
        """The one rule of each numeric setting, the same for every family (None: the
        model's default): :class:`ParamError` naming the request field. What a family adds
        (Wan2.2's ``4k+1`` frames, sizes a multiple of its patch) it checks itself."""
        for name, param, kind, least in NUMBER_RULES:
            value = getattr(self, name)
            if value is None:
                continue
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and (kind == "number" or isinstance(value, int))
            if not ok or not (value > 0 if least == "positive" else value >= 0):
                raise ParamError(param, f"{param} ({value!r}) must be a {least} {kind}")


NUMBER_RULES = (
    # (field, request parameter, "integer" | "number", "positive" | "non-negative")
    ("num_inference_steps", "num_inference_steps", "integer", "positive"),
    ("num_images", "n", "integer", "positive"),
    ("layers", "layers", "integer", "positive"),
    ("num_frames", "num_frames", "integer", "positive"),
    ("fps", "fps", "integer", "positive"),
    ("guidance_scale", "guidance_scale", "number", "non-negative"),
    ("true_cfg_scale", "true_cfg_scale", "number", "non-negative"),
    ("guidance_scale_2", "guidance_scale_2", "number", "non-negative"),
    ("flow_shift", "flow_shift", "number", "positive"),
)
"""What :meth:`GenerationParams.check` asks of each numeric field."""


@dataclass
class GenerationResult:
    """What the returning rank hands back for one request."""

    request_id: str = ""
    images: list[Image.Image] = field(default_factory=list)
    frames: np.ndarray | None = None
    """Video frames ``(F, H, W, 3)`` uint8, or None for images."""
    fps: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    """seed, steps, timings, cache hit ratio, ..."""


@dataclass
class StepEvent:
    """Progress of one denoising step, reported on the returning rank."""

    request_ids: list[str]
    step: int
    total_steps: int
    previews: list[Image.Image] | None = None
    """Decoded intermediate images when a request asked for partial images."""


@dataclass
class DecodeEvent:
    """Progress of the final decode, reported on the returning rank: ``chunk`` of
    ``chunks`` done (0 when it starts). A chunk is one latent frame of a video VAE, one
    up-block of an image VAE (``DenoisingPipeline.decode_chunks``)."""

    request_ids: list[str]
    chunk: int
    chunks: int


StepCallback = Callable[[StepEvent], bool]
"""Called after each step on the returning rank; returning True cancels the batch.
The cancel decision is broadcast by the pipeline so every rank stops at the same step."""

DecodeCallback = Callable[[DecodeEvent], None]
"""Called on the returning rank as the final decode starts and after each of its chunks
(the worker group's decode clock, docs/serving.md); a decode is never cancelled."""


class Pipeline(Protocol):
    """What the engine drives on every rank of a worker group."""

    def generate(
        self,
        batch: list[GenerationParams],
        callback: StepCallback | None = None,
        on_decode: DecodeCallback | None = None,
    ) -> list[GenerationResult]: ...


@dataclass(frozen=True)
class LoraCommand:
    """Adapter management, run on every rank of every worker group like a request."""

    op: str
    """``"load"``, ``"unload"`` or ``"list"``."""
    name: str = ""
    path: str = ""
    scale: float = 1.0


class ParamError(ValueError):
    """A request setting the model cannot take; ``param`` names the request field, so the
    server can answer with an OpenAI error body (``{"error": {"param": ...}}``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def known_join(key: tuple, resolved: dict | None) -> bool | None:
    """The one join rule on a validated request (continuous batching): whether the
    ``join_key`` its validation carries (``resolved``, from rank 0's resolve) equals a
    running step batch's ``key``; None when it carries none (not validated, or a request
    that never joins)."""
    known = (resolved or {}).get("join_key")
    return None if known is None else tuple(known) == tuple(key)
