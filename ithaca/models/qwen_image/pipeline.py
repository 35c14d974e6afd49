"""Qwen-Image text-to-image and edit pipelines over the shared denoising loop.

Numerics follow diffusers' ``QwenImagePipeline``, ``QwenImageEditPipeline`` and
``QwenImageEditPlusPipeline`` (reused pieces: ``calculate_dimensions``); the shared
flow-matching pipeline (:mod:`ithaca.models.flow`) does the rest from :data:`SPEC`:

- prompt: chat template, encoder's last hidden state, system turn dropped (34 / 64
  tokens), embeddings padded with a mask only when a batch mixes lengths;
- noise: ``torch.randn((num_images, 1, C, H/8, W/8), generator=cpu Generator(seed))``
  in the model dtype, then packed into 2x2 patches: what diffusers draws for a CPU
  generator, so a seed gives the same image on any layout and device;
- true CFG: on when ``true_cfg_scale > 1`` and a negative prompt is given; the combined
  prediction is rescaled to the positive prediction's norm (Qwen-Image's own guidance
  rule, :func:`ithaca.models.spec.rescaled_cfg`);
- width and height are rounded down to a multiple of ``2 * vae_scale_factor`` (16 for the
  real VAE), as diffusers does; a size below one multiple is a ``ValueError``.

Placement: the text encoder, tokenizer, image processor and VAE are loaded only on the
replica's rank 0, which encodes prompts (and input images) and broadcasts the small
embeddings; every rank holds the transformer. See ``docs/models.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (
    calculate_dimensions as _edit_dimensions,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    calculate_dimensions as _plus_dimensions,
)
from PIL import Image

from ithaca.models.flow import (
    FlowMatchPipeline,
    pack_latents,
    repeat_rows,
    unpack_latents,
    vae_stats,
)
from ithaca.models.qwen_image import templates
from ithaca.models.qwen_image.transformer import (
    QWEN_IMAGE_ATTENTION,
    QWEN_IMAGE_CACHE,
    QwenImageTransformer2DModel,
)
from ithaca.models.spec import FamilySpec, rescaled_cfg
from ithaca.runtime.loop import Job, Request
from ithaca.types import GenerationParams

logger = logging.getLogger(__name__)

SPEC = FamilySpec(
    name="Qwen-Image",
    transformer=QwenImageTransformer2DModel,
    attention=QWEN_IMAGE_ATTENTION,
    cache_adapter=QWEN_IMAGE_CACHE,
    defaults={"num_inference_steps": 50, "true_cfg_scale": 4.0},
    guidance=rescaled_cfg,
    cfg_needs_negative=True,
    cfg_aliases=False,  # guidance_scale is ignored: Qwen-Image is not guidance-distilled
    tiny="ithaca.testing.tiny:build_tiny_qwen_image",
    tiny_args={"kind": "t2i"},
)


def variant(name: str, kind: str, **changes) -> FamilySpec:
    """Qwen-Image's spec for another of its checkpoints: ``name``, the tiny recipe's
    ``kind`` and what else differs (``images=(1, 16)``)."""
    return dataclasses.replace(SPEC, name=name, tiny_args={"kind": kind}, **changes)


class QwenImagePipeline(FlowMatchPipeline):
    """Text-to-image (``Qwen/Qwen-Image``, ``Qwen/Qwen-Image-2512``)."""

    spec = SPEC
    template = templates.T2I
    max_sequence_length: int | None = 512
    """Prompt tokens kept after the system turn (the reference's default; edit: no limit)."""
    tokenizer_max_length: int | None = 1024
    """Tokens the reference tokenizes after the system turn (edit: no limit)."""

    def __init__(self, model, state, dtype):
        super().__init__(model, state, dtype)
        if self.transformer.config.guidance_embeds:
            raise ValueError(
                f"{model}: guidance-distilled Qwen-Image transformers are not supported"
            )

    def vae_scale(self, model: str) -> int:
        from diffusers import AutoencoderKLQwenImage

        config = AutoencoderKLQwenImage.load_config(model, subfolder="vae")
        return 2 ** len(config["temperal_downsample"])

    def resolve(self, params: GenerationParams) -> Request:
        if params.guidance_scale is not None:
            logger.warning("guidance_scale is ignored: Qwen-Image is not guidance-distilled")
        return super().resolve(params)

    # -- conditioning (returning rank only) ------------------------------------
    def _encode(self, text: str, images: list[Image.Image] | None = None) -> torch.Tensor:
        """Encoder last hidden state of one templated prompt, system turn dropped: (T, D)."""
        vision: dict[str, torch.Tensor] = {}
        if images:
            text, vision = self.expand_vision(text, images)
        drop, most = self.template.drop, self.tokenizer_max_length
        limit = {} if most is None else {"max_length": most + drop, "truncation": True}
        tokens = self.tokenizer(text, return_tensors="pt", **limit).to(self.device)
        keep = self.max_sequence_length and drop + self.max_sequence_length
        return self.text_hidden(tokens, keep=slice(drop, keep), **vision)

    def encode_prompt(self, text: str) -> torch.Tensor:
        return self._encode(self.template.format(text))

    # -- the batch -------------------------------------------------------------
    def batch_text(self, embeds: list[torch.Tensor], requests: list[Request]) -> dict:
        """Per-request (T_i, D) -> (B, T_max, D) and a (B, T_max) mask, None if unpadded
        (decided before the loop, so the check reads the device once per batch)."""
        rows = repeat_rows(embeds, requests)
        t_max = max(e.shape[0] for e in rows)
        batch = torch.stack(
            [torch.cat([e, e.new_zeros(t_max - e.shape[0], e.shape[1])]) for e in rows]
        )
        mask = None
        if any(e.shape[0] != t_max for e in rows):
            mask = torch.stack(
                [torch.arange(t_max, device=batch.device) < e.shape[0] for e in rows]
            )
        return {"encoder_hidden_states": batch, "encoder_hidden_states_mask": mask}

    def _image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        return [(1, request.height // self.multiple, request.width // self.multiple)]

    def forward_inputs(self, requests, conds, latents) -> dict:
        inputs: dict[str, Any] = {}
        self.image_tokens(requests, conds, inputs)
        inputs["img_shapes"] = [self._image_shapes(requests[0])] * latents.shape[0]
        return inputs

    # -- decoding (returning rank only) ----------------------------------------
    def vae_latents(self, job: Job, latents: torch.Tensor) -> torch.Tensor:
        r = job.requests[0]
        latents = unpack_latents(latents, r.height, r.width, self.vae_scale_factor)
        latents = latents.unsqueeze(2).to(self.vae.dtype)  # (B, C, 1, h, w): one frame
        mean, std = vae_stats(self.vae, latents)
        return latents / (1.0 / std) + mean


class QwenImageEditPipeline(QwenImagePipeline):
    """Image editing with one input image (``Qwen/Qwen-Image-Edit``)."""

    spec = variant("Qwen-Image-Edit", "edit", images=(1, 1))
    template = templates.EDIT
    max_sequence_length = None
    tokenizer_max_length = None

    def load_components(self, model: str) -> None:
        super().load_components(model)
        from transformers import AutoTokenizer, Qwen2VLImageProcessor

        # The processor's two parts, used directly: Qwen2VLProcessor itself also builds a
        # video processor, which needs torchvision.
        self.vision_processor = Qwen2VLImageProcessor.from_pretrained(model, subfolder="processor")
        self.tokenizer = AutoTokenizer.from_pretrained(model, subfolder="processor")

    def _dims(self, image: Image.Image, area: int) -> tuple[int, int]:
        return _edit_dimensions(area, image.size[0] / image.size[1])[:2]

    def request_size(self, params: GenerationParams) -> tuple[int, int]:
        """The output takes the input image's aspect ratio (the last image's, with several)
        at the model's area (1024x1024 px), unless the request gives a size."""
        w, h = self._vae_size(params.images[-1])
        w = params.width if params.width is not None else w
        h = params.height if params.height is not None else h
        return self.rounded_size(w, h)

    def extra_key(self, params: GenerationParams) -> tuple:
        return tuple(self._vae_size(im) for im in params.images)

    def _vae_size(self, image: Image.Image) -> tuple[int, int]:
        # The area: diffusers' 1024 * 1024 (Edit-Plus: VAE_IMAGE_SIZE, the same), or the
        # trained size a checkpoint states (_ithaca_defaults)
        return self._dims(image, self.default_width * self.default_height)

    def _image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        shapes = super()._image_shapes(request)
        return shapes + [(1, h // self.multiple, w // self.multiple) for w, h in request.extra_key]

    @torch.no_grad()
    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, 1, H, W) in [-1, 1] -> packed normalised latents (1, S, 4C)."""
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        mean, std = vae_stats(self.vae, latents)
        latents = (latents - mean) / std
        h, w = latents.shape[3:]
        return pack_latents(latents, 1, self.latent_channels, h, w)

    def _condition_images(self, request: Request):
        """(images shown to the text encoder, VAE pixel tensors)."""
        image = request.params.images[0]
        w, h = request.extra_key[0]
        resized = self.image_processor.resize(image, h, w)
        return [resized], [self.image_processor.preprocess(resized, h, w).unsqueeze(2)]

    def _user_turn(self, prompt: str, num_images: int) -> str:
        return prompt

    def condition(self, request: Request) -> dict[str, Any]:
        p = request.params
        shown, pixels = self._condition_images(request)
        n = len(shown)
        prompt = self.template.format(self._user_turn(p.prompt, n))
        cond = {"positive": self._encode(prompt, shown)}
        if request.do_cfg:
            negative = self.template.format(self._user_turn(p.negative_prompt, n))
            cond["negative"] = self._encode(negative, shown)
        cond["image_latents"] = torch.cat([self._encode_image(px) for px in pixels], dim=1)
        return cond


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Image editing with one or more input images (``Qwen/Qwen-Image-Edit-2509``)."""

    spec = variant("Qwen-Image-Edit-2509", "edit_plus", images=(1, 16))
    template = templates.EDIT_PLUS

    def _dims(self, image: Image.Image, area: int) -> tuple[int, int]:
        return _plus_dimensions(area, image.size[0] / image.size[1])

    def _condition_images(self, request: Request):
        shown, pixels = [], []
        for image, (w, h) in zip(request.params.images, request.extra_key, strict=True):
            cw, ch = self._dims(image, CONDITION_IMAGE_SIZE)
            shown.append(self.image_processor.resize(image, ch, cw))
            pixels.append(self.image_processor.preprocess(image, h, w).unsqueeze(2))
        return shown, pixels

    def _user_turn(self, prompt: str, num_images: int) -> str:
        return templates.edit_plus_user_turn(num_images, prompt)
