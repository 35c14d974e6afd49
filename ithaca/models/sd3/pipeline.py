"""Stable Diffusion 3 / 3.5 text-to-image (``stabilityai/stable-diffusion-3.5-large``,
``-medium``) over the shared denoising loop.

Numerics follow diffusers' ``StableDiffusion3Pipeline`` (reused pieces: the VAE image
processor, the scheduler, the transformer's own patchify/unpatchify):

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

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from ithaca.models.base import DenoisingPipeline, Job, Request
from ithaca.models.sd3.cache import cache_adapter
from ithaca.models.sd3.transformer import SD3Transformer2DModel, parallelize
from ithaca.parallel import ParallelState, apply_guidance
from ithaca.parallel.cfg import NEGATIVE, POSITIVE
from ithaca.types import GenerationParams


class StableDiffusion3Pipeline(DenoisingPipeline):
    """SD3 / SD3.5 text-to-image with true CFG."""

    family_name = "SD3"

    default_width = 1024
    default_height = 1024
    default_steps = 28
    default_true_cfg_scale = 3.5
    max_sequence_length = 256

    def __init__(self, model: str, state: ParallelState, dtype: torch.dtype):
        super().__init__(state, dtype)
        self.model = model
        self.transformer = self.load_transformer(SD3Transformer2DModel, model)
        self.runtime = parallelize(self.transformer, state)
        self.load_flow_configs(model)
        self.latent_channels = self.transformer.config.in_channels
        self.multiple = self.vae_scale_factor * self.transformer.config.patch_size
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.vae = self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        if self.is_returning_rank:
            self._load_encoders(model)

    def _load_encoders(self, model: str) -> None:
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        def ready(module):
            return module.to(self.device).eval().requires_grad_(False)

        self.vae = ready(
            AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype)
        )
        self.text_encoder, self.text_encoder_2 = (
            ready(CLIPTextModelWithProjection.from_pretrained(model, subfolder=s, dtype=self.dtype))
            for s in ("text_encoder", "text_encoder_2")
        )
        self.text_encoder_3 = ready(
            T5EncoderModel.from_pretrained(model, subfolder="text_encoder_3", dtype=self.dtype)
        )
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
        self.tokenizer_3 = T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_3")

    # -- request validation ----------------------------------------------------
    def resolve(self, params: GenerationParams) -> Request:
        return self.resolve_text_to_image(params)

    # -- conditioning (returning rank only) ------------------------------------
    @torch.no_grad()
    def _clip(self, tokenizer, encoder, text: str):
        ids = tokenizer(
            text,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2][0], out[0][0]  # (77, D), pooled projection (P,)

    @torch.no_grad()
    def _encode(self, text: str) -> dict[str, torch.Tensor]:
        """Joint text embeddings ``(77 + 256, D_t5)`` and pooled ``(P1 + P2,)``."""
        hidden_1, pooled_1 = self._clip(self.tokenizer, self.text_encoder, text)
        hidden_2, pooled_2 = self._clip(self.tokenizer_2, self.text_encoder_2, text)
        ids = self.tokenizer_3(
            text,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        t5 = self.text_encoder_3(ids)[0][0]  # (256, D_t5)
        clip = torch.cat([hidden_1, hidden_2], dim=-1)  # (77, D1 + D2)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (77, D_t5)
        embeds = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([pooled_1, pooled_2], dim=-1)
        return {"embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def condition(self, request: Request) -> dict[str, Any]:
        p = request.params
        cond: dict[str, Any] = {"positive": self._encode(p.prompt)}
        if request.do_cfg:
            cond["negative"] = self._encode(p.negative_prompt or "")
        return cond

    # -- the batch -------------------------------------------------------------
    def prepare(self, requests: list[Request], conds: list[dict[str, Any]]) -> Job:
        seeds = [c["seed"] for c in conds]
        r0 = requests[0]
        h, w = r0.height // self.vae_scale_factor, r0.width // self.vae_scale_factor
        noise = []
        for r, seed in zip(requests, seeds, strict=True):
            generator = torch.Generator("cpu").manual_seed(seed)
            shape = (r.params.num_images, self.latent_channels, h, w)
            noise.append(torch.randn(shape, generator=generator, dtype=self.dtype))
        latents = torch.cat(noise).to(self.device)  # (B, C, h, w)
        counts = [r.params.num_images for r in requests]

        def rows(key: str, branch: str) -> torch.Tensor:
            per = [c[branch][key] for c in conds]
            return torch.stack([e for e, n in zip(per, counts, strict=True) for _ in range(n)])

        branches = {POSITIVE: "positive"}
        if r0.do_cfg:
            branches[NEGATIVE] = "negative"
        text = {b: (rows("embeds", name), rows("pooled", name)) for b, name in branches.items()}
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        c = self.scheduler_config
        kwargs = {}
        if c.get("use_dynamic_shifting"):
            patch = self.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (h // patch) * (w // patch),
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(r0.steps, device=self.device, **kwargs)
        return Job(requests, seeds, latents, scheduler.timesteps, scheduler, {"text": text})

    @torch.no_grad()
    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        latents = job.latents
        embeds, pooled = job.inputs["text"][branch]
        return self.transformer(
            hidden_states=latents,
            timestep=t.expand(latents.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def cache_adapter(self):
        return cache_adapter(self.model)

    def guide(self, positive, negative, scale):
        return apply_guidance(positive, negative, scale)  # diffusers' SD3: no norm rescale

    @torch.no_grad()
    def decode(self, job: Job, latents: torch.Tensor) -> list[list[Image.Image]]:
        config = self.vae.config
        latents = (latents.to(self.vae.dtype) / config.scaling_factor) + config.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        flat = self.image_processor.postprocess(images, output_type="pil")
        out, start = [], 0
        for req in job.requests:
            out.append(flat[start : start + req.params.num_images])
            start += req.params.num_images
        return out
