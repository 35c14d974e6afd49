"""What every model family declares: defaults, the request rules they share, the hooks'
defaults; the loop that runs them is :class:`ithaca.runtime.loop.DenoisingLoop`.

The diffusers families (the image families and Wan2.2) stand on
:class:`ithaca.models.flow.FlowMatchPipeline`, which builds the loop's hooks from a
:class:`ithaca.models.spec.FamilySpec`; Bagel, which diffusers lacks, fills them itself.
"""

from __future__ import annotations

import torch

from ithaca.cache import BlockCacheAdapter, StepCache, build_cache
from ithaca.config import CacheConfig
from ithaca.models.spec import plain_cfg
from ithaca.runtime.loop import DenoisingLoop, Request
from ithaca.types import GenerationParams, ParamError


class DenoisingPipeline(DenoisingLoop):
    """A model family on the shared loop: its defaults, guidance rule, step cache and LoRA
    targets, and request validation by one rule per field."""

    default_width: int = 1024
    default_height: int = 1024
    default_steps: int = 50
    default_true_cfg_scale: float = 4.0

    guide = staticmethod(plain_cfg)
    """``guide(positive, negative, scale)`` combines the branch predictions (``negative``
    is None without CFG): the family's guidance rule, plain CFG unless it declares another."""

    # -- step caches: what the family's blocks are (LoRA's defaults: runtime.lora.LoraHost)
    def make_cache(self, config: CacheConfig) -> StepCache:
        """Install a step cache on the transformer (families with other layouts override)."""
        adapter = self.cache_adapter()
        return build_cache(config, self.transformer, adapter, self.state, self.runtime)

    def cache_adapter(self) -> BlockCacheAdapter:
        """How this family's blocks look to a step cache."""
        raise ValueError(f"{type(self).__name__} does not support step caching")

    # -- shared request validation (families call these from ``resolve``) ------
    multiple: int = 16
    """Width and height are rounded down to a multiple of this (latent patch x VAE)."""
    takes_layers: bool = False
    """Whether requests may set ``layers`` (layered decomposition models only)."""

    captions_empty_prompt: bool = False
    """Whether an empty prompt is allowed (Qwen-Image-Layered captions the image)."""

    def checked_steps(self, params: GenerationParams) -> int:
        """The rules every family shares, one per field (``ParamError`` naming it):
        prompt, ``num_inference_steps`` (None: the default; anything else must be a
        positive integer, so 0 is an error in every family), ``n``, the step cache
        (:class:`CacheConfig`) and ``layers``.
        Returns the step count."""
        if not isinstance(params.prompt, str) or (
            not params.prompt and not self.captions_empty_prompt
        ):
            raise ParamError("prompt", "prompt must be a non-empty string")
        steps = (
            self.default_steps if params.num_inference_steps is None else params.num_inference_steps
        )
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ParamError(
                "num_inference_steps",
                f"num_inference_steps ({steps!r}) must be a positive integer",
            )
        n = params.num_images
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ParamError("n", f"n ({n!r}) must be a positive integer")
        try:
            CacheConfig.from_dict(params.cache_backend, params.cache_config)
        except ValueError as exc:
            field = "cache_config" if params.cache_config else "cache_backend"
            raise ParamError(field, str(exc)) from None
        if params.layers is not None and not self.takes_layers:
            raise ParamError(
                "layers",
                f"layers is only for layered models (Qwen-Image-Layered); "
                f"{type(self).__name__} returns flat images",
            )
        return steps

    def rounded_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """Defaults filled in, then rounded down to ``multiple`` as diffusers does."""
        w = width if width is not None else self.default_width
        h = height if height is not None else self.default_height
        for name, value in (("width", w), ("height", h)):
            if not isinstance(value, int) or isinstance(value, bool) or value < self.multiple:
                raise ParamError(
                    "size",
                    f"{name} ({value!r}) must be an integer of at least {self.multiple} "
                    f"(sizes are rounded down to a multiple of {self.multiple})",
                )
        return w // self.multiple * self.multiple, h // self.multiple * self.multiple


def seeded_noise(shape, seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    """What diffusers draws for ``torch.Generator("cpu").manual_seed(seed)``: the same
    numbers on any device and layout."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def split_images(flat: list, requests: list[Request]) -> list[list]:
    """A batch's decoded images, one list per request (``num_images`` each, in order)."""
    out, start = [], 0
    for r in requests:
        out.append(flat[start : start + r.params.num_images])
        start += r.params.num_images
    return out
