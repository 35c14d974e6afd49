"""Qwen-Image-Layered: one input image decomposed into N RGBA layers.

Numerics follow diffusers' ``QwenImageLayeredPipeline`` (reused pieces: its latent
packing with a layer axis, ``calculate_dimensions``, its caption prompts, the VAE image
processor, the scheduler). What differs from Qwen-Image-Edit:

- the input image is RGBA (an RGB upload gets an opaque alpha, as the reference's
  example does with ``convert("RGBA")``); the VAE encodes and decodes 4 channels;
- the latent sequence is ``layers + 1`` frames of noise (frame 0 is the composite
  image, dropped at decode) followed by the input image's tokens:
  ``(B, (L + 1) * h * w + h * w, 4C)`` packed, ``img_shapes`` one ``(1, h, w)`` per
  frame plus the condition's; the transformer's layer-axis RoPE
  (``use_layer3d_rope``) gives frame ``i`` the index ``i`` and the condition ``-1``;
- the timestep embedding gets ``additional_t_cond = 0`` per row (the reference's
  ``is_rgb``);
- the prompt is encoded like text-to-image (no vision tokens; at most 512 tokens); an
  empty prompt (``""`` or ``" "``) is replaced by a caption of the input image that the
  text encoder writes (greedy ``generate``, at most 512 new tokens), as the reference does;
- sigmas ``linspace(1, 0, steps + 1)[:-1]`` and ``mu = sqrt(condition tokens / 256)``;
- true CFG as in Qwen-Image, with the norm rescale (``cfg_normalize``: the model card's
  setting; diffusers' call defaults it off); an empty prompt is captioned in English
  (``use_en_prompt``, the model card's setting too).

Output size: the reference's bucket (``resolution`` 640: a 640x640 area with the input's
aspect ratio, multiples of 32), or ``width`` / ``height`` when a request gives them; the
input image is resized to that size too. A request returns ``num_images * layers``
images, image-major. The sequence-parallel plan is Qwen-Image's unchanged: the whole
image sequence (every layer's tokens and the condition's) is one sharded dimension.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import (
    QwenImageLayeredPipeline as _Ref,
)
from PIL import Image

from ithaca.models.flow import decode_3d, seeded_noise, split_images
from ithaca.models.qwen_image import templates
from ithaca.models.qwen_image.pipeline import QwenImageEditPipeline, QwenImagePipeline, variant
from ithaca.runtime.loop import Job, Request
from ithaca.types import GenerationParams, ParamError

logger = logging.getLogger(__name__)

CAPTION_MAX_NEW_TOKENS = 512
BASE_SEQ_LEN = 256 * 256 / 16 / 16
"""The reference's ``base_seqlen`` for ``mu``."""


@functools.cache
def caption_prompt() -> str:
    """The reference's English captioning prompt, read from diffusers."""
    ref = _Ref(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
               transformer=None)  # fmt: skip
    return ref.image_caption_prompt_en


class QwenImageLayeredPipeline(QwenImageEditPipeline):
    """Image to RGBA layers (``Qwen/Qwen-Image-Layered``)."""

    # The output bucket: a 640x640 area (the reference allows 640 and 1024; 640 is
    # recommended) with the input's aspect ratio, unless a request gives the size.
    spec = variant("Qwen-Image-Layered", "layered", images=(1, 1), defaults={
        **QwenImagePipeline.spec.defaults, "width": 640, "height": 640})  # fmt: skip
    template = templates.T2I
    max_sequence_length = 512
    tokenizer_max_length = None
    captions_empty_prompt = True
    takes_layers = True
    default_layers = 4

    def load_components(self, model: str) -> None:
        QwenImagePipeline.load_components(self, model)  # the prompt tokenizer: tokenizer/
        from transformers import AutoTokenizer, Qwen2VLImageProcessor

        # Captioning uses the processor's two parts (its video part needs torchvision).
        self.vision_processor = Qwen2VLImageProcessor.from_pretrained(model, subfolder="processor")
        self.caption_tokenizer = AutoTokenizer.from_pretrained(model, subfolder="processor")

    # -- request validation ----------------------------------------------------
    def extra_key(self, params: GenerationParams) -> tuple:
        layers = self.default_layers if params.layers is None else params.layers
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ParamError("layers", f"layers ({layers!r}) must be a positive integer")
        return (layers,)

    @staticmethod
    def layers_of(request: Request) -> int:
        return request.extra_key[0]

    def _image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        # One (1, h, w) per frame (composite + layers), then the condition image's.
        frame = (1, request.height // self.multiple, request.width // self.multiple)
        return [frame] * (self.layers_of(request) + 1) + [frame]

    # -- conditioning (returning rank only) ------------------------------------
    @torch.no_grad()
    def caption(self, image: Image.Image) -> str:
        """The reference's ``get_image_caption``: the text encoder describes ``image``."""
        text, vision = self.expand_vision(caption_prompt(), [image])
        tokens = self.caption_tokenizer(text, return_tensors="pt").to(self.device)
        generated = self.text_encoder.generate(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            max_new_tokens=CAPTION_MAX_NEW_TOKENS,
            **{k: v.to(self.device) for k, v in vision.items()},
        )
        new = generated[0, tokens.input_ids.shape[1] :]
        return self.caption_tokenizer.decode(
            new, skip_special_tokens=True, clean_up_tokenization_spaces=False
        ).strip()

    def condition(self, request: Request) -> dict:
        p = request.params
        w, h = request.width, request.height
        image = self.image_processor.resize(p.images[0].convert("RGBA"), h, w)
        prompt = p.prompt
        if prompt in ("", " "):
            prompt = self.caption(image)
            logger.info("request %s: caption %r", p.request_id, prompt)
        cond = {"positive": self.encode_prompt(prompt)}
        if request.do_cfg:
            cond["negative"] = self.encode_prompt(p.negative_prompt)
        pixels = self.image_processor.preprocess(image, h, w).unsqueeze(2)  # (1, 4, 1, H, W)
        cond["image_latents"] = self._encode_image(pixels)
        return cond

    # -- the batch -------------------------------------------------------------
    def initial_latents(self, requests: list[Request], seeds: list[int]) -> torch.Tensor:
        """The reference's ``prepare_latents``: ``(n, L + 1, C, h, w)`` -> ``(n, S, 4C)``."""
        h, w = self.latent_hw(requests[0])
        c = self.latent_channels
        noise = []
        for r, seed in zip(requests, seeds, strict=True):
            n, frames = r.params.num_images, self.layers_of(r) + 1
            x = seeded_noise((n, frames, c, h, w), seed, self.dtype, self.device)
            noise.append(_Ref._pack_latents(x, n, c, h, w, frames))
        return torch.cat(noise)

    def prepare(self, requests: list[Request], conds: list[dict]) -> Job:
        job = super().prepare(requests, conds)
        rows = job.latents.shape[0]
        job.inputs["additional_t_cond"] = torch.zeros(rows, dtype=torch.long, device=self.device)
        return job

    def schedule(self, steps: int, latents: torch.Tensor, inputs: dict):
        """Sigmas ``linspace(1, 0, steps + 1)[:-1]``, ``mu = sqrt(condition tokens / 256)``."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        mu = (inputs["image_latents"].shape[1] / BASE_SEQ_LEN) ** 0.5
        sigmas = np.linspace(1.0, 0, steps + 1)[:-1]
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return scheduler

    # -- decoding (returning rank only) ------------------------------------------
    @torch.no_grad()
    def _decode_frames(self, job: Job, latents: torch.Tensor, frames: slice) -> list:
        """``frames`` of every row, each decoded as one PIL RGBA image: per request, its
        rows' lists of frames."""
        r = job.requests[0]
        layers = self.layers_of(r)
        latents = _Ref._unpack_latents(latents, r.height, r.width, layers, self.vae_scale_factor)
        latents = latents[:, :, frames]  # (B, C, F, h, w) of the L + 1 frames
        f = latents.shape[2]
        # (B, C, F, h, w) -> (B * F, C, 1, h, w): every frame decoded as one image
        images = decode_3d(self.vae, latents.transpose(1, 2).flatten(0, 1).unsqueeze(2))
        flat = self.image_processor.postprocess(images[:, :, 0], output_type="pil")
        return split_images([flat[i : i + f] for i in range(0, len(flat), f)], job.requests)

    def decode(self, job: Job, latents: torch.Tensor) -> list[list[Image.Image]]:
        # Frame 0 is the composite image: the layers are frames 1..L, image-major.
        rows = self._decode_frames(job, latents, slice(1, None))
        return [[layer for row in request for layer in row] for request in rows]

    def preview(self, job: Job, x0: torch.Tensor) -> list[Image.Image]:
        """The composite frame's x0 estimate of each request's first image."""
        return [rows[0][0] for rows in self._decode_frames(job, x0, slice(0, 1))]
