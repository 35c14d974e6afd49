"""Stable Diffusion 3 / 3.5 text-to-image (``stabilityai/stable-diffusion-3.5-large``,
``-medium``) over the shared denoising loop.

Numerics follow diffusers' ``StableDiffusion3Pipeline``; the shared flow-matching
pipeline (:mod:`ithaca.models.flow`) does the rest from :data:`SPEC`:

- prompt: both CLIP encoders' penultimate hidden states (77 tokens, concatenated on the
  channel dim and zero-padded to T5's width) followed by T5's last hidden state
  (``max_sequence_length`` = 256 tokens) on the sequence dim; pooled = both CLIP
  projections concatenated;
- noise: ``torch.randn((n, C, H/8, W/8), generator=cpu Generator(seed))`` in the model
  dtype, unpacked; the transformer sees the raw timestep ``t``;
- CFG: the scale is ``true_cfg_scale`` (diffusers calls it ``guidance_scale``; that name
  is accepted too); on when ``> 1``, with the negative prompt defaulting to ``""``, and
  combined as ``neg + scale * (pos - neg)``: the two branches can run CFG-parallel.
  Skip-layer guidance is not supported;
- width and height are rounded down to a multiple of ``vae_scale_factor * patch_size``.

Placement: the three text encoders, their tokenizers and the VAE live only on the
replica's rank 0.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ithaca.models.flow import FlowMatchPipeline
from ithaca.models.flux.transformer import FLUX_CACHE
from ithaca.models.sd3.transformer import SD3_ATTENTION, SD3Transformer2DModel
from ithaca.models.spec import FamilySpec

SPEC = FamilySpec(
    name="SD3",
    transformer=SD3Transformer2DModel,
    attention=SD3_ATTENTION,
    components=(
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ),
    cache_adapter=dataclasses.replace(FLUX_CACHE, blocks="transformer_blocks"),  # one stack
    defaults={"num_inference_steps": 28, "true_cfg_scale": 3.5},
    packed=False,
    sigmas="scheduler",
    tiny="ithaca.testing.tiny_families:build_tiny_sd3",
)


class StableDiffusion3Pipeline(FlowMatchPipeline):
    """SD3 / SD3.5 text-to-image with true CFG."""

    spec = SPEC
    max_sequence_length = 256

    def __init__(self, model, state, dtype):
        super().__init__(model, state, dtype)
        self.multiple = self.vae_scale_factor * self.transformer.config.patch_size

    @torch.no_grad()
    def _clip(self, tokenizer, encoder, text: str):
        ids = self.tokens(text, self.tokenizer.model_max_length, tokenizer).input_ids
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2][0], out[0][0]  # (77, D), pooled projection (P,)

    @torch.no_grad()
    def encode_prompt(self, text: str) -> dict[str, torch.Tensor]:
        """Joint text embeddings ``(77 + 256, D_t5)`` and pooled ``(P1 + P2,)``."""
        hidden_1, pooled_1 = self._clip(self.tokenizer, self.text_encoder, text)
        hidden_2, pooled_2 = self._clip(self.tokenizer_2, self.text_encoder_2, text)
        ids = self.tokens(text, self.max_sequence_length, self.tokenizer_3).input_ids
        t5 = self.text_encoder_3(ids)[0][0]  # (256, D_t5)
        clip = torch.cat([hidden_1, hidden_2], dim=-1)  # (77, D1 + D2)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (77, D_t5)
        embeds = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([pooled_1, pooled_2], dim=-1)
        return {"encoder_hidden_states": embeds.to(self.dtype),
                "pooled_projections": pooled.to(self.dtype)}  # fmt: skip

    def seq_len(self, latents: torch.Tensor) -> int:
        patch = self.transformer.config.patch_size
        return (latents.shape[-2] // patch) * (latents.shape[-1] // patch)

    def timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return t.expand(latents.shape[0])  # the raw timestep, in the scheduler's dtype
