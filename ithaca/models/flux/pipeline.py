"""FLUX.1 text-to-image (``black-forest-labs/FLUX.1-dev``, ``FLUX.1-schnell``).

Numerics follow diffusers' ``FluxPipeline`` (reused pieces: latent packing, latent
position ids, ``calculate_shift``, the VAE image processor, the scheduler):

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

import logging
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline as _Ref
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from ithaca.models.base import DenoisingPipeline, Job, Request
from ithaca.models.flux.cache import cache_adapter
from ithaca.models.flux.transformer import FluxTransformer2DModel, parallelize
from ithaca.parallel import ParallelState, apply_guidance
from ithaca.parallel.cfg import POSITIVE
from ithaca.types import GenerationParams

logger = logging.getLogger(__name__)


class FluxPipeline(DenoisingPipeline):
    """FLUX.1-dev / -schnell text-to-image over the shared denoising loop."""

    default_width = 1024
    default_height = 1024
    default_steps = 28
    default_true_cfg_scale = 1.0
    default_guidance_scale = 3.5
    max_sequence_length = 512
    """T5 tokens per prompt (diffusers' default; the limit of the model)."""

    def __init__(self, model: str, state: ParallelState, dtype: torch.dtype):
        super().__init__(state, dtype)
        self.model = model
        self.transformer = self.load_transformer(FluxTransformer2DModel, model)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        if not self.guidance_embeds:
            self.default_steps = 4  # FLUX.1-schnell is timestep-distilled
        self.runtime = parallelize(self.transformer, state)
        self.load_flow_configs(model)
        self.latent_channels = self.transformer.config.in_channels // 4
        self.multiple = self.vae_scale_factor * 2
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.multiple)
        self.vae = self.text_encoder = self.text_encoder_2 = None
        self.tokenizer = self.tokenizer_2 = None
        if self.is_returning_rank:
            self._load_encoders(model)

    def _load_encoders(self, model: str) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        def ready(module):
            return module.to(self.device).eval().requires_grad_(False)

        self.vae = ready(
            AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype)
        )
        self.text_encoder = ready(
            CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=self.dtype)
        )
        self.text_encoder_2 = ready(
            T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2", dtype=self.dtype)
        )
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_2")

    # -- request validation ----------------------------------------------------
    def resolve(self, params: GenerationParams) -> Request:
        if params.images:
            raise ValueError(f"{type(self).__name__} is text-to-image and takes no input images")
        steps = self.checked_steps(params)
        if params.guidance_scale is not None and not self.guidance_embeds:
            logger.warning("guidance_scale is ignored: this FLUX.1 model has no guidance input")
        w, h = self.rounded_size(params.width, params.height)
        scale = params.true_cfg_scale
        scale = self.default_true_cfg_scale if scale is None else float(scale)
        do_cfg = scale > 1 and params.negative_prompt is not None
        return Request(params, w, h, steps, scale, do_cfg, params.seed)

    def _guidance(self, request: Request) -> float:
        g = request.params.guidance_scale
        return self.default_guidance_scale if g is None else float(g)

    # -- conditioning (returning rank only) ------------------------------------
    @torch.no_grad()
    def _encode(self, text: str) -> dict[str, torch.Tensor]:
        """CLIP pooled ``(D_clip,)`` and T5 hidden states ``(T, D_t5)`` of one prompt."""
        clip = self.tokenizer(
            text,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        pooled = self.text_encoder(clip.input_ids.to(self.device)).pooler_output[0]
        t5 = self.tokenizer_2(
            text,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds = self.text_encoder_2(t5.input_ids.to(self.device))[0][0]
        return {"embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def condition(self, request: Request) -> dict[str, Any]:
        p = request.params
        cond: dict[str, Any] = {"positive": self._encode(p.prompt)}
        if request.do_cfg:
            cond["negative"] = self._encode(p.negative_prompt)
        return cond

    # -- the batch -------------------------------------------------------------
    def _latent_hw(self, request: Request) -> tuple[int, int]:
        return 2 * (request.height // self.multiple), 2 * (request.width // self.multiple)

    def _noise(self, request: Request, seed: int) -> torch.Tensor:
        """diffusers' ``prepare_latents`` for one CPU generator: packed (n, S, 4C)."""
        h, w = self._latent_hw(request)
        n = request.params.num_images
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((n, self.latent_channels, h, w), generator=generator, dtype=self.dtype)
        return _Ref._pack_latents(noise.to(self.device), n, self.latent_channels, h, w)

    def prepare(self, requests: list[Request], conds: list[dict[str, Any]]) -> Job:
        seeds = [c["seed"] for c in conds]
        latents = torch.cat([self._noise(r, s) for r, s in zip(requests, seeds, strict=True)])
        counts = [r.params.num_images for r in requests]

        def rows(key: str, branch: str) -> torch.Tensor:
            per = [c[branch][key] for c in conds]
            return torch.stack([e for e, n in zip(per, counts, strict=True) for _ in range(n)])

        branches = {POSITIVE: "positive"}
        if requests[0].do_cfg:
            branches[1] = "negative"
        text = {b: (rows("embeds", name), rows("pooled", name)) for b, name in branches.items()}
        h, w = self._latent_hw(requests[0])
        inputs: dict[str, Any] = {
            "text": text,
            "img_ids": _Ref._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype),
            "txt_ids": torch.zeros(
                self.max_sequence_length, 3, device=self.device, dtype=self.dtype
            ),
            "guidance": None,
        }
        if self.guidance_embeds:
            per_row = [
                self._guidance(r) for r, n in zip(requests, counts, strict=True) for _ in range(n)
            ]
            inputs["guidance"] = torch.tensor(per_row, device=self.device, dtype=torch.float32)
        steps = requests[0].steps
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        c = self.scheduler_config
        mu = calculate_shift(
            latents.shape[1],
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return Job(requests, seeds, latents, scheduler.timesteps, scheduler, inputs)

    @torch.no_grad()
    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        latents = job.latents
        embeds, pooled = job.inputs["text"][branch]
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return self.transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=job.inputs["guidance"],
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=job.inputs["txt_ids"][: embeds.shape[1]],
            img_ids=job.inputs["img_ids"],
            return_dict=False,
        )[0]

    def cache_adapter(self):
        return cache_adapter(self.model)

    def guide(self, positive, negative, scale):
        return apply_guidance(positive, negative, scale)  # diffusers' FLUX: no norm rescale

    @torch.no_grad()
    def decode(self, job: Job, latents: torch.Tensor) -> list[list[Image.Image]]:
        r = job.requests[0]
        latents = _Ref._unpack_latents(latents, r.height, r.width, self.vae_scale_factor)
        config = self.vae.config
        latents = (latents.to(self.vae.dtype) / config.scaling_factor) + config.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        flat = self.image_processor.postprocess(images, output_type="pil")
        out, start = [], 0
        for req in job.requests:
            out.append(flat[start : start + req.params.num_images])
            start += req.params.num_images
        return out
