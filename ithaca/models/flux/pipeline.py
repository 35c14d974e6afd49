"""FLUX.1 text-to-image (``black-forest-labs/FLUX.1-dev``, ``FLUX.1-schnell``).

Numerics follow diffusers' ``FluxPipeline``; the shared flow-matching pipeline
(:mod:`ithaca.models.flow`) does the rest from :data:`SPEC`:

- prompt: CLIP pooled output (padded to 77 tokens) and T5 last hidden state (padded to
  ``max_sequence_length`` = 512 tokens); text position ids are zeros;
- noise: ``torch.randn((n, C, H/8, W/8), generator=cpu Generator(seed))`` in the model
  dtype, packed into 2x2 patches (what diffusers draws for a CPU generator);
- guidance: FLUX.1-dev is guidance-distilled, so ``guidance_scale`` (default 3.5) is an
  input of the transformer, not a second branch; schnell has no guidance input.
  True CFG is opt-in, as in diffusers: on when ``true_cfg_scale > 1`` and a
  ``negative_prompt`` is given, combined as ``neg + scale * (pos - neg)`` with no
  rescale; then the two branches can run CFG-parallel;
- width and height are rounded down to a multiple of ``2 * vae_scale_factor``.

Placement: the text encoders, tokenizers and the VAE live only on the replica's rank 0;
every rank holds the transformer.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline as _Ref

from ithaca.models.flow import FlowMatchPipeline, repeat_rows
from ithaca.models.flux.transformer import FLUX_ATTENTION, FLUX_CACHE, FluxTransformer2DModel
from ithaca.models.spec import FamilySpec

SPEC = FamilySpec(
    name="FLUX.1",
    transformer=FluxTransformer2DModel,
    attention=FLUX_ATTENTION,
    components=("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    cache_adapter=FLUX_CACHE,
    defaults={"num_inference_steps": 28, "true_cfg_scale": 1.0},
    cfg_needs_negative=True,  # true CFG is opt-in, as in diffusers
    cfg_aliases=False,  # guidance_scale is the embedded guidance
    tiny="ithaca.testing.tiny_families:build_tiny_flux",
)


class FluxPipeline(FlowMatchPipeline):
    """FLUX.1-dev / -schnell text-to-image."""

    spec = SPEC
    default_guidance_scale = 3.5
    max_sequence_length = 512
    """T5 tokens per prompt (diffusers' default; the limit of the model)."""

    def __init__(self, model, state, dtype):
        super().__init__(model, state, dtype)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        if not self.guidance_embeds:
            self.default_steps = 4  # FLUX.1-schnell is timestep-distilled

    @torch.no_grad()
    def encode_prompt(self, text: str) -> dict[str, torch.Tensor]:
        """CLIP pooled ``(D_clip,)`` and T5 hidden states ``(T, D_t5)`` of one prompt."""
        pooled = self.text_encoder(self.tokens(text).input_ids).pooler_output[0]
        t5 = self.tokens(text, self.max_sequence_length, self.tokenizer_2)
        embeds = self.text_encoder_2(t5.input_ids)[0][0]
        return {"encoder_hidden_states": embeds.to(self.dtype),
                "pooled_projections": pooled.to(self.dtype)}  # fmt: skip

    def forward_inputs(self, requests, conds, latents) -> dict:
        h, w = self.latent_hw(requests[0])
        guidance = None
        if self.guidance_embeds:  # one scale per image row
            scales = [self.default_guidance_scale if g is None else float(g)
                      for g in (r.params.guidance_scale for r in requests)]  # fmt: skip
            rows = repeat_rows(scales, requests)
            guidance = torch.tensor(rows, device=self.device, dtype=torch.float32)
        t = self.max_sequence_length
        return {
            "img_ids": _Ref._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype),
            "txt_ids": torch.zeros(t, 3, device=self.device, dtype=self.dtype),
            "guidance": guidance,
        }
