"""Z-Image text-to-image (``Tongyi-MAI/Z-Image-Turbo``) over the shared denoising loop.

Numerics follow diffusers' ``ZImagePipeline``; the shared flow-matching pipeline
(:mod:`ithaca.models.flow`) does the rest from :data:`SPEC`:

- prompt: Qwen3 chat template (``enable_thinking=True``), padded to
  ``max_sequence_length`` = 512 tokens, the encoder's second-to-last hidden state with
  the padding removed: ``(T, D)`` per prompt, lengths differ (the transformer pads and
  masks captions itself);
- noise: ``torch.randn((n, C, H/8, W/8), generator=cpu Generator(seed))`` in float32,
  unpacked (the transformer patchifies); latents and the scheduler stay float32;
- the transformer sees ``(1000 - t) / 1000`` and its output is negated;
- CFG: the scale is ``true_cfg_scale`` (diffusers calls it ``guidance_scale``; that name
  is accepted too). Z-Image-Turbo's default is 0: no negative branch. With a scale
  ``> 0`` the negative prompt defaults to ``""`` and the branches combine as
  ``pos + scale * (pos - neg)`` (diffusers' Z-Image formula; ``cfg_normalization`` and
  ``cfg_truncation`` are left at diffusers' defaults, off);
- sigmas ``torch.linspace(1, 1/steps, steps)``; width and height are rounded down to a
  multiple of ``2 * vae_scale_factor``.

Placement: the text encoder, tokenizer and VAE live only on the replica's rank 0.
"""

from __future__ import annotations

import torch

from ithaca.models.flow import FlowMatchPipeline, repeat_rows
from ithaca.models.spec import FamilySpec
from ithaca.models.z_image.transformer import (
    Z_IMAGE_ATTENTION,
    Z_IMAGE_CACHE,
    ZImageTransformer2DModel,
)
from ithaca.runtime.loop import Job


def z_image_cfg(positive: torch.Tensor, negative: torch.Tensor | None, scale: float):
    """Z-Image's formula, ``pos + scale * (pos - neg)``, not the usual
    ``neg + s * (pos - neg)``. Negating both predictions first (``forward`` does)
    commutes exactly with it."""
    if negative is None:
        return positive
    return positive + scale * (positive - negative)


SPEC = FamilySpec(
    name="Z-Image",
    transformer=ZImageTransformer2DModel,
    attention=Z_IMAGE_ATTENTION,
    cache_adapter=Z_IMAGE_CACHE,
    defaults={"num_inference_steps": 9, "true_cfg_scale": 0.0},
    guidance=z_image_cfg,
    cfg_above=0.0,
    packed=False,
    noise_dtype=torch.float32,
    latents_dtype=torch.float32,
    sigmas="torch_linspace",
    tiny="ithaca.testing.tiny_families:build_tiny_z_image",
)


class ZImagePipeline(FlowMatchPipeline):
    """Z-Image(-Turbo) text-to-image."""

    spec = SPEC
    max_sequence_length = 512

    def encode_prompt(self, text: str) -> torch.Tensor:
        """Second-to-last encoder hidden state of the templated prompt, unpadded: (T, D)."""
        tokens = self.tokens(self.chat(text, enable_thinking=True), self.max_sequence_length)
        return self.text_hidden(tokens, layer=-2, pads="drop")

    def batch_text(self, embeds, requests):
        return repeat_rows(embeds, requests)  # lengths differ: the transformer pads them

    def forward(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        latents = job.latents
        timestep = (1000 - t.expand(latents.shape[0])) / 1000
        # (B, C, h, w) -> B x (C, 1, h, w): one frame per image
        frames = list(latents.to(self.dtype).unsqueeze(2).unbind(dim=0))
        out = self.transformer(frames, timestep, job.inputs["text"][branch], return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # (B, C, h, w)
