"""What a model family declares: one :class:`FamilySpec` per diffusers ``_class_name``.

In the spirit of torchtitan's ``TrainSpec``: the spec names the transformer (which
carries its ``_sp_plan``), which block lists get the parallel attention processor,
the step-cache adapter, the components the returning rank loads, how latents are
laid out and scheduled, the guidance rule, the defaults, the tiny-checkpoint recipe and
the diffusers reference. :class:`ithaca.models.flow.FlowMatchPipeline` builds loading,
conditioning, ``prepare``, the loop and ``decode`` from it; a family class writes only
prompt encoding and the transformer's forward arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ithaca.cache import BlockCacheAdapter
from ithaca.parallel import apply_guidance
from ithaca.runtime.parallelize import AttentionLayout

GuidanceRule = Callable[[torch.Tensor, torch.Tensor | None, float], torch.Tensor]


def plain_cfg(positive: torch.Tensor, negative: torch.Tensor | None, scale: float):
    """``neg + scale * (pos - neg)``: the common classifier-free guidance rule."""
    return apply_guidance(positive, negative, scale)


def rescaled_cfg(positive: torch.Tensor, negative: torch.Tensor | None, scale: float):
    """Qwen-Image's rule: plain CFG rescaled to the positive prediction's norm per token."""
    return apply_guidance(positive, negative, scale, rescale_to_positive_norm=True)


DEFAULTS = {
    "width": "default_width",
    "height": "default_height",
    "num_inference_steps": "default_steps",
    "true_cfg_scale": "default_true_cfg_scale",
    "guidance_scale": "default_true_cfg_scale",  # Wan2.2's name for its CFG scale
    "num_frames": "default_num_frames",
    "fps": "default_fps",
}
"""Request field -> the pipeline attribute holding its default: what a
:attr:`FamilySpec.defaults` and a checkpoint's ``model_index.json`` ``_ithaca_defaults``
(what the default models were trained at; diffusers ignores ``_`` keys) may set."""


@dataclass(frozen=True)
class FamilySpec:
    """One model family, declared. See ``docs/models.md`` "Adding a family"."""

    name: str
    """How error messages name the family ("FLUX.1")."""
    transformer: type
    """The diffusers transformer subclass that declares ``_sp_plan``."""
    attention: AttentionLayout
    components: tuple[str, ...] = ("vae", "text_encoder", "tokenizer")
    """``model_index.json`` components the returning rank loads (encoders, tokenizers,
    VAE); their classes come from the checkpoint's own index."""
    cache_adapter: BlockCacheAdapter | Callable[[str | None], BlockCacheAdapter] | None = None
    """How the blocks look to the step caches; a checkpoint's fitted coefficients
    (``ithaca.json``) replace its ``teacache_coefficients``. Or a function of the
    checkpoint directory returning the adapter (Wan2.2's); None: no step caching."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Defaults by request field (keys of :data:`DEFAULTS`); unset: 1024 x 1024 px, 50
    steps, CFG scale 4.0. A checkpoint's ``_ithaca_defaults`` take precedence."""
    guidance: GuidanceRule = plain_cfg
    cfg_above: float = 1.0
    """CFG is on when the scale is above this ..."""
    cfg_needs_negative: bool = False
    """... and, if True, only when the request gives a negative prompt."""
    cfg_aliases: bool = True
    """``guidance_scale`` is accepted as another name of the CFG scale (diffusers' name
    for it in SD3, Z-Image, LongCat, Ovis); False: the family reads it itself."""
    images: tuple[int, int] = (0, 0)
    """(fewest, most) input images a request may carry."""
    edit_size: Callable[[float, float], tuple[int, int]] | None = None
    """The reference's ``calculate_dimensions(area, aspect ratio) -> (width, height)``: an
    edit model's default output size is its last input image's aspect ratio at the
    default size's area. None: the default size (Wan2.2's image-to-video too)."""
    packed: bool = True
    """Latents are 2x2 patches packed into tokens ``(B, S, 4C)`` (FLUX-style); False:
    ``(B, C, h, w)`` and the transformer patchifies."""
    noise_dtype: torch.dtype | None = None
    """dtype of the seeded noise draw (None: the model dtype)."""
    latents_dtype: torch.dtype | None = None
    """dtype the latents stay in through the loop (None: the noise's)."""
    sigmas: str = "linspace"
    """``"linspace"``: ``np.linspace(1, 1/steps, steps)``; ``"torch_linspace"``: the same
    in float32; ``"scheduler"``: the scheduler's own timesteps."""
    tiny: str | None = None
    """``"module:function"`` building a tiny random checkpoint ``(path, seed=0, **tiny_args)``
    for tests (a string: the runtime never imports test helpers)."""
    tiny_args: Mapping[str, Any] = field(default_factory=dict)
    reference: str | None = None
    """The diffusers pipeline class that is this family's numerical oracle; None: the one
    named like the family's pipeline class (the checkpoint's ``_class_name``)."""
    scheduler: type | None = None
    """The scheduler class built from the checkpoint's ``scheduler`` config (None:
    ``FlowMatchEulerDiscreteScheduler``; Wan2.2: ``UniPCMultistepScheduler``)."""
    vae_dtype: torch.dtype | None = None
    """dtype the VAE is loaded in (None: the model dtype; Wan2.2: fp32, as diffusers'
    Wan examples load it)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.defaults) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"{self.name}: defaults {unknown} must be among {sorted(DEFAULTS)}")
