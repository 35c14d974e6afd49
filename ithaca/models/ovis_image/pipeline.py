"""Ovis-Image text-to-image (``AIDC-AI/Ovis-Image``) over the shared denoising loop.

Numerics follow diffusers' ``OvisImagePipeline`` (reused pieces: latent packing, latent
position ids, ``calculate_shift``, the VAE image processor, the scheduler):

- prompt: the system instruction prepended to the user turn, Qwen3 chat template
  (``enable_thinking=False``), padded to ``28 + max_sequence_length`` (256) tokens;
  Qwen3's last hidden state with padding zeroed and the first 28 (template) tokens
  dropped: ``(256, D)``; text position ids ``(0, i, i)``, image ids FLUX's;
- noise: ``torch.randn((n, C, H/8, W/8), generator=cpu Generator(seed))`` in the model
  dtype, packed into 2x2 patches;
- CFG: on when ``true_cfg_scale > 1`` (diffusers calls it ``guidance_scale``; accepted
  too; default 5.0), negative prompt default ``""``, ``neg + s * (pos - neg)``.

Placement: the text encoder, tokenizer and VAE live only on the replica's rank 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.ovis_image.pipeline_ovis_image import OvisImagePipeline as _Ref
from diffusers.pipelines.ovis_image.pipeline_ovis_image import calculate_shift
from PIL import Image

from ithaca.models.base import DenoisingPipeline, Job, Request
from ithaca.models.flux.cache import cache_adapter  # FLUX.1's blocks
from ithaca.models.ovis_image.transformer import OvisImageTransformer2DModel, parallelize
from ithaca.parallel import ParallelState, apply_guidance
from ithaca.parallel.cfg import NEGATIVE, POSITIVE
from ithaca.types import GenerationParams

SYSTEM_PROMPT = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, "
    "spatial relationships of the objects and background: "
)
TEMPLATE_TOKENS = 28
"""Tokens of the chat template before the user's prompt (diffusers' user_prompt_begin_id)."""


class OvisImagePipeline(DenoisingPipeline):
    """Ovis-Image text-to-image with true CFG."""

    family_name = "Ovis-Image"

    default_width = 1024
    default_height = 1024
    default_steps = 50
    default_true_cfg_scale = 5.0
    max_sequence_length = 256

    def __init__(self, model: str, state: ParallelState, dtype: torch.dtype):
        super().__init__(state, dtype)
        self.model = model
        self.transformer = self.load_transformer(OvisImageTransformer2DModel, model)
        self.runtime = parallelize(self.transformer, state)
        self.load_flow_configs(model)
        self.latent_channels = self.transformer.config.in_channels // 4
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
        return self.resolve_text_to_image(params)

    # -- conditioning (returning rank only) ------------------------------------
    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        """Qwen3's last hidden state after the template, padding zeroed: ``(256, D)``."""
        templated = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": SYSTEM_PROMPT + text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        tokens = self.tokenizer(
            templated,
            padding="max_length",
            truncation=True,
            max_length=self.max_sequence_length + TEMPLATE_TOKENS,
            return_tensors="pt",
            add_special_tokens=False,
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask)
        hidden = hidden.last_hidden_state * mask[..., None]
        return hidden[0, TEMPLATE_TOKENS:].to(self.dtype)

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
        c_lat = self.latent_channels
        noise = []
        for r, seed in zip(requests, seeds, strict=True):
            n = r.params.num_images
            generator = torch.Generator("cpu").manual_seed(seed)
            x = torch.randn((n, c_lat, h, w), generator=generator, dtype=self.dtype)
            noise.append(_Ref._pack_latents(x.to(self.device), n, c_lat, h, w))
        latents = torch.cat(noise)
        counts = [r.params.num_images for r in requests]

        def rows(key: str) -> torch.Tensor:
            return torch.stack(
                [c[key] for c, n in zip(conds, counts, strict=True) for _ in range(n)]
            )

        inputs: dict[str, Any] = {"text": {POSITIVE: rows("embeds")}}
        if requests[0].do_cfg:
            inputs["text"][NEGATIVE] = rows("negative")
        t = self.max_sequence_length
        txt_ids = torch.zeros(t, 3)
        txt_ids[:, 1] = torch.arange(t)
        txt_ids[:, 2] = torch.arange(t)
        inputs["txt_ids"] = txt_ids.to(self.device, self.dtype)
        inputs["img_ids"] = _Ref._prepare_latent_image_ids(
            1, h // 2, w // 2, self.device, self.dtype
        )
        steps = requests[0].steps
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        c = self.scheduler_config
        mu = calculate_shift(
            latents.shape[1],
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        if c.get("use_flow_sigmas", False):
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            sigmas = np.linspace(1.0, 1 / steps, steps)
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return Job(requests, seeds, latents, scheduler.timesteps, scheduler, inputs)

    @torch.no_grad()
    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        latents = job.latents
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            encoder_hidden_states=job.inputs["text"][branch],
            txt_ids=job.inputs["txt_ids"],
            img_ids=job.inputs["img_ids"],
            return_dict=False,
        )[0]

    def cache_adapter(self):
        return cache_adapter(self.model)

    def guide(self, positive, negative, scale):
        return apply_guidance(positive, negative, scale)  # diffusers' Ovis: no norm rescale

    @torch.no_grad()
    def decode(self, job: Job, latents: torch.Tensor) -> list[list[Image.Image]]:
        r = job.requests[0]
        latents = _Ref._unpack_latents(latents, r.height, r.width, self.vae_scale_factor)
        config = self.vae.config
        latents = ((latents / config.scaling_factor) + config.shift_factor).to(self.vae.dtype)
        images = self.vae.decode(latents, return_dict=False)[0]
        flat = self.image_processor.postprocess(images, output_type="pil")
        out, start = [], 0
        for req in job.requests:
            out.append(flat[start : start + req.params.num_images])
            start += req.params.num_images
        return out
