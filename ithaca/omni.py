"""The reference system's documented offline API, over :class:`ithaca.api.Ithaca`.

    from ithaca import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams

    omni = Omni(
        model="Qwen/Qwen-Image",
        parallel_config=DiffusionParallelConfig(ulysses_degree=2),
        cache_backend="tea_cache",
        cache_config={"rel_l1_thresh": 0.2},
    )
    outputs = omni.generate(
        "A cat sitting on a windowsill",
        OmniDiffusionSamplingParams(num_inference_steps=50, width=2048, height=2048),
    )
    outputs[0].images[0].save("cat.png")

Edits pass a dict: ``{"prompt": ..., "multi_modal_data": {"image": img_or_list}}``.
``generate`` also takes the sampling fields as keywords
(``omni.generate(prompt="...", num_inference_steps=50)``) and a list of prompts; it
returns one :class:`~ithaca.types.GenerationResult` per prompt.

A hub id that is not a local directory resolves to its Hugging Face snapshot
(``huggingface_hub.snapshot_download``; with ``HF_HUB_OFFLINE=1`` only the local cache
is used), so every rank loads the same files.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ithaca.api import Ithaca
from ithaca.config import CacheConfig, ParallelConfig
from ithaca.types import GenerationParams, GenerationResult, open_image


@dataclass
class OmniDiffusionSamplingParams:
    """Sampling settings of one ``generate`` call. ``None`` means the model's default."""

    num_inference_steps: int | None = None
    """Denoising steps."""
    width: int | None = None
    """Output width in pixels."""
    height: int | None = None
    """Output height in pixels."""
    guidance_scale: float | None = None
    """Embedded (distilled) guidance, for models that take one."""
    true_cfg_scale: float | None = None
    """Classifier-free guidance with a negative branch; needs a ``negative_prompt`` (an
    empty string counts) to take effect."""
    negative_prompt: str | None = None
    """Negative prompt of the CFG branch (a prompt dict's ``negative_prompt`` wins)."""
    seed: int | None = None
    """Random seed; ``None`` draws one (reported in the result's metadata)."""
    num_outputs_per_prompt: int = 1
    """Images per prompt."""
    layers: int | None = None
    """Output layers per image (layered decomposition models)."""
    num_frames: int | None = None
    """Video: frame count."""
    fps: int | None = None
    """Video: frames per second of the output."""
    guidance_scale_2: float | None = None
    """Video: guidance of the second (low-noise) expert."""
    flow_shift: float | None = None
    """Video: the scheduler's flow shift."""

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "width", "height", "layers", "num_frames", "fps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if not isinstance(self.num_outputs_per_prompt, int) or self.num_outputs_per_prompt < 1:
            raise ValueError(
                f"num_outputs_per_prompt ({self.num_outputs_per_prompt!r}) must be a "
                f"positive integer"
            )

    def to_fields(self) -> dict[str, Any]:
        """The :class:`GenerationParams` fields these settings set."""
        fields = dataclasses.asdict(self)
        fields["num_images"] = fields.pop("num_outputs_per_prompt")
        return fields


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(OmniDiffusionSamplingParams)}


def resolve_model(model: str | None) -> str | None:
    """A local checkpoint directory for ``model`` (a directory, or a hub id's snapshot)."""
    if model is None or os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(model)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise ValueError(
            f"model ({model!r}) is neither a local directory nor a downloadable hub id: {exc}"
        ) from exc


def _cache_options(cache_config: Any) -> dict | None:
    """``cache_config`` as a dict: a dict, a CacheConfig, a dataclass or a plain object."""
    if cache_config is None or isinstance(cache_config, dict):
        return cache_config
    if isinstance(cache_config, CacheConfig):
        return cache_config.as_dict()
    if dataclasses.is_dataclass(cache_config) and not isinstance(cache_config, type):
        return dataclasses.asdict(cache_config)
    for method in ("to_dict", "as_dict"):
        if callable(getattr(cache_config, method, None)):
            return dict(getattr(cache_config, method)())
    if hasattr(cache_config, "__dict__"):
        return {k: v for k, v in vars(cache_config).items() if not k.startswith("_")}
    raise ValueError(
        f"cache_config ({type(cache_config).__name__}) must be a dict or an object with fields"
    )


def _images(value: Any) -> list[Image.Image]:
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        if isinstance(item, str | os.PathLike):
            item = open_image(item)
        if not isinstance(item, Image.Image):
            raise ValueError(
                f"multi_modal_data['image'] must be PIL images or paths, not {type(item).__name__}"
            )
        out.append(item)
    return out


def _prompt_fields(prompt: str | dict) -> dict[str, Any]:
    """A text prompt, or ``{"prompt", "negative_prompt"?, "multi_modal_data"?}``."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not isinstance(prompt, dict):
        raise ValueError(f"prompt must be a string or a dict, not {type(prompt).__name__}")
    unknown = sorted(set(prompt) - {"prompt", "negative_prompt", "multi_modal_data"})
    if unknown:
        raise ValueError(
            f"prompt dict has unknown key(s) {unknown}; "
            f"known: prompt, negative_prompt, multi_modal_data"
        )
    if not isinstance(prompt.get("prompt"), str):
        raise ValueError("prompt dict needs a 'prompt' string")
    fields: dict[str, Any] = {"prompt": prompt["prompt"]}
    if prompt.get("negative_prompt") is not None:
        fields["negative_prompt"] = prompt["negative_prompt"]
    media = prompt.get("multi_modal_data") or {}
    unknown = sorted(set(media) - {"image"})
    if unknown:
        raise ValueError(f"multi_modal_data has unsupported key(s) {unknown}; supported: image")
    if "image" in media:
        fields["images"] = _images(media["image"])
    return fields


class Omni:
    """A generator over one model, configured as the reference API documents.

    ``parallel_config`` (a :class:`~ithaca.config.DiffusionParallelConfig`) with more
    than one rank runs a torchrun worker group on this machine, as ``ithaca serve``
    does; ``cache_backend`` (``"tea_cache"`` / ``"cache_dit"``) with ``cache_config`` (a
    dict or an object with fields) is the default step cache of every request.
    """

    def __init__(
        self,
        model: str | None = None,
        parallel_config: ParallelConfig | None = None,
        cache_backend: str | None = None,
        cache_config: Any = None,
        *,
        dtype: str | None = None,
        executor: str | None = None,
        startup_timeout_s: float = 600.0,
    ):
        if parallel_config is not None and not isinstance(parallel_config, ParallelConfig):
            raise ValueError(
                f"parallel_config must be a DiffusionParallelConfig, "
                f"not {type(parallel_config).__name__}"
            )
        self.model = model
        self.parallel_config = parallel_config or ParallelConfig()
        self.cache = CacheConfig.from_dict(cache_backend, _cache_options(cache_config))
        self._ithaca = Ithaca(
            resolve_model(model),
            parallel=self.parallel_config,
            cache=self.cache,
            dtype=dtype,
            executor=executor,
            startup_timeout_s=startup_timeout_s,
        )
        # Stop the worker group when the object goes away (or at exit) if close() was not
        # called, as a script that never closes it expects.
        self._finalizer = weakref.finalize(self, self._ithaca.close)

    def generate(
        self,
        prompt: str | dict | list[str | dict] | None = None,
        sampling_params: OmniDiffusionSamplingParams | None = None,
        **sampling: Any,
    ) -> list[GenerationResult]:
        """One result per prompt; sampling from ``sampling_params`` and/or keywords."""
        if prompt is None:
            raise ValueError("generate() needs a prompt")
        unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown sampling parameter(s) {unknown}; known: {sorted(_SAMPLING_FIELDS)}"
            )
        params = sampling_params or OmniDiffusionSamplingParams()
        if sampling:
            params = dataclasses.replace(params, **sampling)
        prompts = prompt if isinstance(prompt, list) else [prompt]
        results = []
        for p in prompts:
            fields = {**params.to_fields(), **_prompt_fields(p)}
            # metadata["warnings"] lists what the pipeline warned about (logged there once)
            results.append(self._ithaca.engine.generate(GenerationParams(**fields)))
        return results

    def close(self) -> None:
        """Stop the engine and its worker group (idempotent)."""
        self._finalizer()

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
