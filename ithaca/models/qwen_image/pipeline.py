"""Qwen-Image text-to-image and edit pipelines over the shared denoising loop.

Numerics follow diffusers' ``QwenImagePipeline``, ``QwenImageEditPipeline`` and
``QwenImageEditPlusPipeline`` (reused pieces: ``calculate_dimensions``, the same in
Edit, Edit-Plus and Layered); the shared
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
from typing import Any

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    calculate_dimensions,
)
from PIL import Image

from ithaca.models.flow import (
    FlowMatchPipeline,
    pack_latents,
    repeat_rows,
    vae_stats,
)
from ithaca.models.qwen_image import templates
from ithaca.models.qwen_image.transformer import (
    QWEN_IMAGE_ATTENTION,
    QWEN_IMAGE_CACHE,
    QwenImageTransformer2DModel,
)
from ithaca.models.spec import FamilySpec, rescaled_cfg
from ithaca.runtime.loop import Request
from ithaca.types import GenerationParams

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
    """Qwen-Image's spec for another of its checkpoints (each takes input images, sized
    by ``calculate_dimensions``): ``name``, the tiny recipe's ``kind`` and what else
    differs (``images=(1, 16)``)."""
    return dataclasses.replace(
        SPEC, name=name, tiny_args={"kind": kind}, edit_size=calculate_dimensions, **changes
    )


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

    # -- conditioning (returning rank only) ------------------------------------
    def encode_prompt(self, text: str, shown: list[Image.Image] | None = None) -> torch.Tensor:
        """Encoder last hidden state of ``text`` in the template (edit: with ``shown``, the
        input images), system turn dropped: (T, D)."""
        text, vision = self.template.format(text, len(shown or ())), {}
        if shown:
            text, vision = self.expand_vision(text, shown)
        drop, most = self.template.drop, self.tokenizer_max_length
        limit = {} if most is None else {"max_length": most + drop, "truncation": True}
        tokens = self.tokenizer(text, return_tensors="pt", **limit).to(self.device)
        keep = self.max_sequence_length and drop + self.max_sequence_length
        return self.text_hidden(tokens, keep=slice(drop, keep), **vision)

    # -- the batch -------------------------------------------------------------
    def batch_text(self, embeds: list[torch.Tensor], requests: list[Request]) -> dict:
        """Per-request (T_i, D) -> (B, T_max, D) and a (B, T_max) mask, None if unpadded
        (decided before the loop, so the check reads the device once per batch)."""
        rows = repeat_rows(embeds, requests)
        batch = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # zeros after each
        lengths = [e.shape[0] for e in rows]
        mask = None
        if min(lengths) < batch.shape[1]:  # (B, T_max): True = a prompt token
            positions = torch.arange(batch.shape[1], device=batch.device)
            mask = positions < torch.tensor(lengths, device=batch.device)[:, None]
        return {"encoder_hidden_states": batch, "encoder_hidden_states_mask": mask}

    def _image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        return [(1, request.height // self.multiple, request.width // self.multiple)]

    def forward_inputs(self, requests, conds, latents) -> dict:
        inputs: dict[str, Any] = {}
        self.image_tokens(requests, conds, inputs)
        inputs["img_shapes"] = [self._image_shapes(requests[0])] * latents.shape[0]
        return inputs


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

    def extra_key(self, params: GenerationParams) -> tuple:
        # Each image's VAE size at the default area: diffusers' 1024 * 1024 (Edit-Plus:
        # VAE_IMAGE_SIZE, the same), or the trained size a checkpoint states
        return tuple(self.input_size(im) for im in params.images)

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

    def encode_images(self, request: Request) -> tuple[list[Image.Image], dict]:
        """The input image at its VAE size: shown to the text encoder, and its latents."""
        w, h = request.extra_key[0]
        shown = self.image_processor.resize(request.params.images[0], h, w)
        pixels = self.image_processor.preprocess(shown, h, w).unsqueeze(2)  # (1, 3, 1, H, W)
        return [shown], {"image_latents": self._encode_image(pixels)}


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Image editing with one or more input images (``Qwen/Qwen-Image-Edit-2509``)."""

    spec = variant("Qwen-Image-Edit-2509", "edit_plus", images=(1, 16))
    template = templates.EDIT_PLUS

    def encode_images(self, request: Request) -> tuple[list[Image.Image], dict]:
        """Each image shown to the text encoder at ``CONDITION_IMAGE_SIZE`` px; their
        latents, each at its VAE size, one after the other."""
        shown, latents = [], []
        for image, (w, h) in zip(request.params.images, request.extra_key, strict=True):
            cw, ch = self.input_size(image, CONDITION_IMAGE_SIZE)
            shown.append(self.image_processor.resize(image, ch, cw))
            pixels = self.image_processor.preprocess(image, h, w).unsqueeze(2)
            latents.append(self._encode_image(pixels))
        return shown, {"image_latents": torch.cat(latents, dim=1)}
