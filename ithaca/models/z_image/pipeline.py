"""Z-Image text-to-image (``Tongyi-MAI/Z-Image-Turbo``) over the shared denoising loop.

Numerics follow diffusers' ``ZImagePipeline`` (reused pieces: ``calculate_shift``, the
VAE image processor, the scheduler, the transformer's own patchify/unpatchify):

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

from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift
from PIL import Image

from ithaca.models.base import DenoisingPipeline, Job, Request
from ithaca.models.z_image.cache import cache_adapter
from ithaca.models.z_image.transformer import ZImageTransformer2DModel, parallelize
from ithaca.parallel import ParallelState
from ithaca.parallel.cfg import NEGATIVE, POSITIVE
from ithaca.types import GenerationParams


class ZImagePipeline(DenoisingPipeline):
    """Z-Image(-Turbo) text-to-image."""

    family_name = "Z-Image"

    default_width = 1024
    default_height = 1024
    default_steps = 9
    default_true_cfg_scale = 0.0
    max_sequence_length = 512

    def __init__(self, model: str, state: ParallelState, dtype: torch.dtype):
        super().__init__(state, dtype)
        self.model = model
        self.transformer = self.load_transformer(ZImageTransformer2DModel, model)
        self.runtime = parallelize(self.transformer, state)
        self.load_flow_configs(model)
        self.latent_channels = self.transformer.config.in_channels
        self.multiple = self.vae_scale_factor * 2
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.multiple)
        self.vae = self.text_encoder = self.tokenizer = None
        if self.is_returning_rank:
            self._load_encoders(model)

    def _load_encoders(self, model: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        self.text_encoder = AutoModel.from_pretrained(
            model, subfolder="text_encoder", dtype=self.dtype
        )
        self.text_encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")

    # -- request validation ----------------------------------------------------
    def resolve(self, params: GenerationParams) -> Request:
        return self.resolve_text_to_image(params, cfg_above=0.0)

    # -- conditioning (returning rank only) ------------------------------------
    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        """Second-to-last encoder hidden state of the templated prompt, unpadded: (T, D)."""
        templated = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        tokens = self.tokenizer(
            templated,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=mask,
            output_hidden_states=True,
        ).hidden_states[-2]
        return hidden[0][mask[0]].to(self.dtype)

    def condition(self, request: Request) -> dict[str, Any]:
        p = request.params
        cond = {"embeds": self._encode(p.prompt)}
        if request.do_cfg:
            cond["negative"] = self._encode(p.negative_prompt or "")
        return cond

    # -- the batch -------------------------------------------------------------
    def _latent_hw(self, request: Request) -> tuple[int, int]:
        return 2 * (request.height // self.multiple), 2 * (request.width // self.multiple)

    def prepare(self, requests: list[Request], conds: list[dict[str, Any]]) -> Job:
        seeds = [c["seed"] for c in conds]
        h, w = self._latent_hw(requests[0])
        noise = []
        for r, seed in zip(requests, seeds, strict=True):
            generator = torch.Generator("cpu").manual_seed(seed)
            shape = (r.params.num_images, self.latent_channels, h, w)
            noise.append(torch.randn(shape, generator=generator, dtype=torch.float32))
        latents = torch.cat(noise).to(self.device)  # (B, C, h, w) float32
        counts = [r.params.num_images for r in requests]

        def rows(key: str) -> list[torch.Tensor]:
            return [c[key] for c, n in zip(conds, counts, strict=True) for _ in range(n)]

        inputs: dict[str, Any] = {"text": {POSITIVE: rows("embeds")}}
        if requests[0].do_cfg:
            inputs["text"][NEGATIVE] = rows("negative")
        steps = requests[0].steps
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        c = self.scheduler_config
        mu = calculate_shift(
            (h // 2) * (w // 2),
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()  # diffusers' Z-Image default
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return Job(requests, seeds, latents, scheduler.timesteps, scheduler, inputs)

    @torch.no_grad()
    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        latents = job.latents
        timestep = (1000 - t.expand(latents.shape[0])) / 1000
        # (B, C, h, w) -> B x (C, 1, h, w): one frame per image
        frames = list(latents.to(self.dtype).unsqueeze(2).unbind(dim=0))
        out = self.transformer(frames, timestep, job.inputs["text"][branch], return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # (B, C, h, w)

    def cache_adapter(self):
        return cache_adapter(self.model)

    def guide(self, positive, negative, scale):
        if negative is None:
            return positive
        # Z-Image's formula, not the usual neg + s * (pos - neg). Negating both
        # predictions first (predict does) commutes exactly with it.
        return positive + scale * (positive - negative)

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
