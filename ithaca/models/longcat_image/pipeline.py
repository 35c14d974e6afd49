"""LongCat-Image text-to-image (``meituan-longcat/LongCat-Image``) over the shared loop.

Numerics follow diffusers' ``LongCatImagePipeline`` with ``enable_prompt_rewrite=False``
(reused pieces: ``split_quotation``, ``prepare_pos_ids``); the shared flow-matching
pipeline (:mod:`ithaca.models.flow`) does the rest from :data:`SPEC`. The transformer
has FLUX.1's layout and takes its plan and processor unchanged:

- prompt: quoted spans tokenized character by character, the rest normally; padded to
  512 tokens, wrapped in the captioning system template; Qwen2.5-VL's last hidden
  state without the template tokens: ``(512, D)``; text position ids
  ``(0, i, i)``, image ids ``(1, 512 + row, 512 + col)``;
- noise: ``torch.randn((n, 16, H/8, W/8), generator=cpu Generator(seed))`` in float32,
  cast to the model dtype and packed into 2x2 patches;
- CFG: on when ``true_cfg_scale > 1`` (diffusers calls it ``guidance_scale``; accepted
  too; default 4.5), negative prompt default ``""``; ``neg + s * (pos - neg)`` then
  LongCat's renorm: scaled by ``clamp(|pos| / (|combined| + 1e-8), 0, 1)`` per token;
- diffusers' default LLM prompt rewriting (``enable_prompt_rewrite=True``) is not done:
  the prompt is encoded as given.

Placement: the text encoder, tokenizer and VAE live only on the replica's rank 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import LongCatImageTransformer2DModel as _DiffusersLongCatTransformer
from diffusers.pipelines.longcat_image.pipeline_longcat_image import (
    prepare_pos_ids,
    split_quotation,
)
from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions
from PIL import Image

from ithaca.models.flow import FlowMatchPipeline, pack_latents
from ithaca.models.flux.transformer import FLUX_ATTENTION, FLUX_CACHE, FLUX_SP_PLAN, LONGCAT_TP_PLAN
from ithaca.models.spec import FamilySpec, plain_cfg
from ithaca.runtime.loop import Request

PREFIX = (
    "<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt "
    "based on an image content, suitable for input to a text-to-image model.<|im_end|>\n"
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


class LongCatImageTransformer2DModel(_DiffusersLongCatTransformer):
    """diffusers' LongCat-Image transformer with FLUX.1's sequence-parallel plan declared."""

    _sp_plan = FLUX_SP_PLAN
    _tp_plan = LONGCAT_TP_PLAN


def renormed_cfg(positive: torch.Tensor, negative: torch.Tensor | None, scale: float):
    """Plain CFG, then LongCat's renorm: never above the positive prediction's per-token
    norm (``clamp(|pos| / (|combined| + 1e-8), 0, 1)``)."""
    if negative is None:
        return positive
    combined = plain_cfg(positive, negative, scale)
    cond_norm = torch.norm(positive, dim=-1, keepdim=True)
    noise_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / (noise_norm + 1e-8)).clamp(min=0.0, max=1.0)


SPEC = FamilySpec(
    name="LongCat-Image",
    transformer=LongCatImageTransformer2DModel,
    attention=FLUX_ATTENTION,
    cache_adapter=FLUX_CACHE,  # FLUX.1's blocks
    defaults={"num_inference_steps": 50, "true_cfg_scale": 4.5},
    guidance=renormed_cfg,
    noise_dtype=torch.float32,  # diffusers' LongCat t2i draws fp32 noise, then casts
    tiny="ithaca.testing.tiny_families:build_tiny_longcat_image",
)


class LongCatImagePipeline(FlowMatchPipeline):
    """LongCat-Image text-to-image with true CFG and LongCat's CFG renorm."""

    spec = SPEC
    max_sequence_length = 512
    latent_channels = 16

    def _token_ids(self, text: str) -> list[int]:
        """Quoted spans character by character, the rest as usual; at most 512 ids."""
        ids: list[int] = []
        for part, quoted in split_quotation(text):
            for piece in part if quoted else [part]:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids[: self.max_sequence_length]

    def _wrapped(self, prefix: str, text: str) -> tuple[dict, slice]:
        """``input_ids`` and ``attention_mask`` ``(1, P + 512 + S)`` of ``prefix``, the
        prompt padded to 512 and the suffix, on the device; and the prompt's ``(P, -S)``."""
        padded = self.tokenizer.pad({"input_ids": [self._token_ids(text)]},
                                    max_length=self.max_sequence_length, padding="max_length",
                                    return_attention_mask=True)  # fmt: skip
        prefix_ids, suffix_ids = (
            self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prefix, SUFFIX)
        )
        ids = prefix_ids + padded["input_ids"][0] + suffix_ids
        mask = [1] * len(prefix_ids) + padded["attention_mask"][0] + [1] * len(suffix_ids)
        tokens = {"input_ids": ids, "attention_mask": mask}
        tokens = {k: torch.tensor([v], device=self.device) for k, v in tokens.items()}
        return tokens, slice(len(prefix_ids), -len(suffix_ids))

    def encode_prompt(self, text: str) -> torch.Tensor:
        """Last hidden state of the templated, padded prompt without the template: (512, D)."""
        return self.text_hidden(*self._wrapped(PREFIX, text))

    def forward_inputs(self, requests, conds, latents) -> dict:
        h, w = self.latent_hw(requests[0])
        t = conds[0]["positive"].shape[0]  # 512; edit: + the vision tokens, equal per size
        inputs: dict[str, Any] = {
            "txt_ids": prepare_pos_ids(modality_id=0, type="text", num_token=t).to(self.device),
            "img_ids": prepare_pos_ids(
                modality_id=1, type="image", start=(t, t), height=h // 2, width=w // 2
            ).to(self.device),
        }
        self.image_tokens(requests, conds, inputs)
        if "image_latents" in inputs:  # edit: the input image's tokens follow the noise
            image_ids = prepare_pos_ids(
                modality_id=2, type="image", start=(t, t), height=h // 2, width=w // 2
            ).to(self.device, torch.float64)  # float64 as in diffusers (the cat promotes)
            inputs["img_ids"] = torch.cat([inputs["img_ids"], image_ids])
        return inputs


VISION = "<|vision_start|>"
EDIT_PREFIX = (
    "<|im_start|>system\nAs an image editing expert, first analyze the content and attributes "
    "of the input image(s). Then, based on the user's editing instructions, clearly and "
    "precisely determine how to modify the given image(s), ensuring that only the specified "
    "parts are altered and all other aspects remain consistent with the original(s)."
    "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
)


class LongCatImageEditPipeline(LongCatImagePipeline):
    """LongCat-Image-Edit (``meituan-longcat/LongCat-Image-Edit``): one input image.

    As diffusers' ``LongCatImageEditPipeline``: the output size is the input's aspect
    ratio at the default area, 1024x1024 px (rounded up to multiples of 16), unless the
    request gives a size (the reference takes none); the text encoder sees the prompt
    with the image at half that size, and the embeddings keep the vision tokens; the
    image's VAE latents (mode, ``(x - shift) * scale``) follow the noise tokens with
    position ids of modality 2; CFG is plain ``neg + s * (pos - neg)`` (no renorm);
    noise is drawn in the model dtype.
    """

    spec = dataclasses.replace(
        SPEC,
        guidance=plain_cfg,  # the edit pipeline has no renorm
        images=(1, 1),
        edit_size=calculate_dimensions,
        noise_dtype=None,
        tiny_args={"edit": True},
    )

    def load_components(self, model: str) -> None:
        super().load_components(model)
        from transformers import Qwen2VLImageProcessor

        self.vision_processor = Qwen2VLImageProcessor.from_pretrained(
            model, subfolder="text_processor"
        )

    def encode_prompt(self, text: str, shown: list[Image.Image]) -> torch.Tensor:
        """Last hidden state from ``<|vision_start|>`` to the suffix: ``(V + 512, D)``."""
        prefix, vision = self.expand_vision(EDIT_PREFIX, shown)
        tokens, prompt = self._wrapped(prefix, text)
        start = tokens["input_ids"][0].tolist().index(self.tokenizer.convert_tokens_to_ids(VISION))
        return self.text_hidden(tokens, keep=slice(start, prompt.stop), **vision)

    def encode_images(self, request: Request) -> tuple[list[Image.Image], dict]:
        """The input image at the output size: its packed latents; shown to the text
        encoder at half that size."""
        w, h = request.width, request.height
        image = self.image_processor.resize(request.params.images[0], h, w)
        pixels = self.image_processor.preprocess(image, h, w).to(self.device, self.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        config = self.vae.config
        latents = (latents - config.shift_factor) * config.scaling_factor
        lh, lw = latents.shape[2:]
        shown = self.image_processor.resize(image, h // 2, w // 2)
        return [shown], {"image_latents": pack_latents(latents, 1, self.latent_channels, lh, lw)}
