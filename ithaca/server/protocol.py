"""Pydantic request models of the HTTP API; the only place pydantic is used.

Every optional field accepts ``null``. Unknown fields are kept aside
(``model_extra``) so the route can log and ignore them. Multipart forms go through
the same models: pydantic's lax mode turns ``"2"`` into ``2`` and ``"true"`` into
``True``. ``to_params()`` produces the plain :class:`GenerationParams` the engine takes.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ithaca.config import CacheConfig
from ithaca.types import GenerationParams, LoraRef

_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # ASCII digits, matched whole
MAX_SIDE = 4096
MAX_LAYERS = 16
_NUMBERS = {
    "n",
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "seed",
    "output_compression",
    "partial_images",
    "layers",
    "num_frames",
    "fps",
    "guidance_scale_2",
    "flow_shift",
}
MODEL_OPTIONS = (
    "cfg_text_scale",
    "cfg_img_scale",
    "cfg_interval",
    "cfg_renorm_type",
    "cfg_renorm_min",
    "timestep_shift",
    "num_timesteps",
)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (W, H); ``"auto"`` / None -> the model's default."""
    if size is None or size == "auto":
        return None, None
    m = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if not m:
        raise ValueError(f"size ({size!r}) must be 'auto' or WIDTHxHEIGHT, e.g. 1024x1024")
    w, h = int(m.group(1)), int(m.group(2))
    if not (16 <= w <= MAX_SIDE and 16 <= h <= MAX_SIDE):
        raise ValueError(f"size ({size}) must have both sides in 16..{MAX_SIDE}")
    return w, h


def _json_text(value, what: str):
    """A multipart form field sent as JSON text, parsed (other values pass through)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what}: {exc}") from None
    return value


class LoraItem(BaseModel):
    """One adapter of a request's ``lora`` list."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    scale: float | None = Field(default=None, ge=-100, le=100)
    """None: the scale the adapter was loaded with."""
    expert: Literal["high_noise", "low_noise"] | None = None
    """Two-expert video models (Wan2.2 A14B): the expert it applies to; None: both."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    user: str | None = None
    # extensions shared by images and videos
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    true_cfg_scale: float | None = Field(default=None, ge=0, le=100)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    cache_backend: str | None = None
    cache_config: dict | None = None
    """Per-request step cache (overrides the server's); multipart sends it as JSON text."""
    lora: str | LoraItem | list[str | LoraItem] | None = None
    """Extension: LoRA adapters by name (``GET /v1/loras``), one or a stacked list of
    ``{name, scale, expert}``; multipart sends a name or JSON text."""

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_json(cls, v):
        if isinstance(v, str) and v.lstrip().startswith(("[", "{")):
            try:
                return json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"lora must be a name or JSON: {exc}") from None
        return v

    def lora_refs(self) -> tuple[LoraRef, ...]:
        items = self.lora if isinstance(self.lora, list) else [self.lora] if self.lora else []
        return tuple(
            LoraRef(i) if isinstance(i, str) else LoraRef(i.name, i.scale, i.expert) for i in items
        )

    @field_validator("cache_config", mode="before")
    @classmethod
    def _cache_config_json(cls, v):
        return _json_text(v, "cache_config must be a JSON object")

    @field_validator("cache_backend")
    @classmethod
    def _cache_backend(cls, v):
        CacheConfig.from_dict(v, None)
        return v

    @field_validator("cache_config")
    @classmethod
    def _cache_options(cls, v, info):
        CacheConfig.from_dict(info.data.get("cache_backend"), v)
        return v

    def common_params(self) -> dict:
        """The :class:`GenerationParams` fields every request kind fills the same way."""
        width, height = parse_size(self.size)
        return dict(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            true_cfg_scale=self.true_cfg_scale,
            seed=self.seed,
            lora=self.lora_refs(),
            cache_backend=self.cache_backend,
            cache_config=self.cache_config,
        )

    @field_validator("size", check_fields=False)
    @classmethod
    def _size(cls, v):
        parse_size(v)
        return v

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v, info):
        # Lax mode would read true/false as 1/0.
        if isinstance(v, bool) and info.field_name in _NUMBERS:
            raise ValueError("must be a number, not a boolean")
        return v

    def extra_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ImageRequest(_Request):
    """``POST /v1/images/generations`` (JSON) and the fields of ``/v1/images/edits``."""

    n: int | None = Field(default=None, ge=1, le=10)
    size: str | None = None
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: str | None = None
    style: str | None = None
    input_fidelity: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    layers: int | None = Field(default=None, ge=1, le=MAX_LAYERS)
    """Extension for layered models (Qwen-Image-Layered): RGBA layers per image; the
    response has ``n * layers`` entries, image-major."""
    # Bagel's sampling extensions (GenerationParams.model_options; the model validates)
    cfg_text_scale: float | None = Field(default=None, ge=0, le=100)
    cfg_img_scale: float | None = Field(default=None, ge=0, le=100)
    cfg_interval: list[float] | None = Field(default=None, min_length=2, max_length=2)
    """``[lo, hi]``; a multipart form sends it as JSON text."""
    cfg_renorm_type: Literal["global", "channel", "text_channel"] | None = None
    cfg_renorm_min: float | None = Field(default=None, ge=0, le=1)
    timestep_shift: float | None = Field(default=None, gt=0, le=100)
    num_timesteps: int | None = Field(default=None, ge=2, le=1001)

    @field_validator("cfg_interval", mode="before")
    @classmethod
    def _interval_json(cls, v):
        return _json_text(v, "cfg_interval must be a JSON list [lo, hi]")

    def model_options(self) -> dict:
        return {k: getattr(self, k) for k in MODEL_OPTIONS if getattr(self, k) is not None}

    def to_params(self) -> GenerationParams:
        return GenerationParams(
            **self.common_params(),
            num_images=self.n or 1,
            layers=self.layers,
            partial_images=(self.partial_images or 0) if self.stream else 0,
            model_options=self.model_options(),
        )


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    image_url: str | None = None
    file_id: str | None = None


class ImageEditJSON(ImageRequest):
    """The JSON form of ``/v1/images/edits``: ``images: [{"image_url": "data:..."}]``."""

    images: list[ImageURL] = Field(min_length=1, max_length=16)
    mask: ImageURL | None = None


class VideoRequest(_Request):
    """``POST /v1/videos`` (multipart as the SDK sends it, or JSON)."""

    seconds: str | None = None
    size: str | None = None
    num_frames: int | None = Field(default=None, ge=1, le=1024)
    fps: int | None = Field(default=None, ge=1, le=120)
    guidance_scale_2: float | None = Field(default=None, ge=0, le=100)
    flow_shift: float | None = Field(default=None, gt=0, le=100)

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds(cls, v):
        if v is None:
            return v
        v = str(v)
        try:
            ok = 0 < float(v) <= 60
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"seconds ({v!r}) must be a number in (0, 60]")
        return v

    def to_params(self, default_fps: int = 16) -> GenerationParams:
        fps = self.fps or default_fps
        frames = self.num_frames
        if frames is None:
            frames = max(1, round(float(self.seconds or 4) * fps)) + 1  # Wan-style 4k+1 frames
            frames = frames - (frames - 1) % 4
        return GenerationParams(
            **self.common_params(),
            guidance_scale_2=self.guidance_scale_2,
            flow_shift=self.flow_shift,
            num_frames=frames,
            fps=fps,
        )


class VideoJSON(VideoRequest):
    """The JSON form of ``POST /v1/videos`` as ``/openapi.json`` documents it: the route
    takes ``input_reference`` (a data URL, the first frame) out before validating."""

    input_reference: ImageURL | None = None
