"""Ovis-Image text-to-image (``AIDC-AI/Ovis-Image``) over the shared denoising loop.

Numerics follow diffusers' ``OvisImagePipeline``; the shared flow-matching pipeline
(:mod:`ithaca.models.flow`) does the rest from :data:`SPEC`. The transformer has
FLUX.1's layout and takes its plan and processor unchanged:

- prompt: the reference's system instruction prepended to the user turn, Qwen3 chat
  template (``enable_thinking=False``), padded to ``28 + max_sequence_length`` (256) tokens;
  Qwen3's last hidden state with padding zeroed and the first 28 (template) tokens
  dropped: ``(256, D)``; text position ids ``(0, i, i)``, image ids FLUX's;
- noise: ``torch.randn((n, C, H/8, W/8), generator=cpu Generator(seed))`` in the model
  dtype, packed into 2x2 patches;
- CFG: on when ``true_cfg_scale > 1`` (diffusers calls it ``guidance_scale``; accepted
  too; default 5.0), negative prompt default ``""``, ``neg + s * (pos - neg)``.

Placement: the text encoder, tokenizer and VAE live only on the replica's rank 0.
"""

from __future__ import annotations

import torch
from diffusers import OvisImageTransformer2DModel as _DiffusersOvisTransformer
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids
from diffusers.pipelines.ovis_image.pipeline_ovis_image import OvisImagePipeline as _Ref

from ithaca.models.flow import FlowMatchPipeline, reference_pipeline
from ithaca.models.flux.transformer import FLUX_ATTENTION, FLUX_CACHE, FLUX_SP_PLAN, OVIS_TP_PLAN
from ithaca.models.spec import FamilySpec


class OvisImageTransformer2DModel(_DiffusersOvisTransformer):
    """diffusers' Ovis-Image transformer with FLUX.1's sequence-parallel plan declared."""

    _sp_plan = FLUX_SP_PLAN
    _tp_plan = OVIS_TP_PLAN
    _tp_local_sizes = ("single_transformer_blocks.*.mlp_hidden_dim",)  # its split point


SPEC = FamilySpec(
    name="Ovis-Image",
    transformer=OvisImageTransformer2DModel,
    attention=FLUX_ATTENTION,
    cache_adapter=FLUX_CACHE,  # FLUX.1's blocks
    defaults={"num_inference_steps": 50, "true_cfg_scale": 5.0},
    tiny="ithaca.testing.tiny_families:build_tiny_ovis_image",
)


class OvisImagePipeline(FlowMatchPipeline):
    """Ovis-Image text-to-image with true CFG."""

    spec = SPEC
    max_sequence_length = 256

    def encode_prompt(self, text: str) -> torch.Tensor:
        """Qwen3's last hidden state after the template, padding zeroed: ``(256, D)``."""
        ref = reference_pipeline(_Ref)  # its system prompt, the template's token count
        templated = self.chat(ref.system_prompt + text, enable_thinking=False)
        begin = ref.user_prompt_begin_id
        tokens = self.tokens(templated, self.max_sequence_length + begin, add_special_tokens=False)
        return self.text_hidden(tokens, keep=slice(begin, None), pads="zero")

    def forward_inputs(self, requests, conds, latents) -> dict:
        h, w = self.latent_hw(requests[0])
        # (0, i, i) per text token: diffusers' Ovis builds it inline, LongCat's helper the same
        txt_ids = prepare_pos_ids(type="text", num_token=self.max_sequence_length)
        return {
            "txt_ids": txt_ids.to(self.device, self.dtype),
            "img_ids": _Ref._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype),
        }
