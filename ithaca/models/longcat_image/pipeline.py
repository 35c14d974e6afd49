"""LongCat-Image text-to-image (``meituan-longcat/LongCat-Image``) over the shared loop.

Numerics follow diffusers' ``LongCatImagePipeline`` with ``enable_prompt_rewrite=False``
(reused pieces: ``split_quotation``, ``prepare_pos_ids``, latent packing,
``calculate_shift``, the VAE image processor, the scheduler):

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

from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.longcat_image.pipeline_longcat_image import (
    LongCatImagePipeline as _Ref,
)
from diffusers.pipelines.longcat_image.pipeline_longcat_image import (
    calculate_shift,
    prepare_pos_ids,
    split_quotation,
)
from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions
from PIL import Image

from ithaca.models.base import DenoisingPipeline, Job, Request
from ithaca.models.flux.cache import cache_adapter  # FLUX.1's blocks
from ithaca.models.longcat_image.transformer import LongCatImageTransformer2DModel, parallelize
from ithaca.parallel import ParallelState, apply_guidance
from ithaca.parallel.cfg import NEGATIVE, POSITIVE
from ithaca.types import GenerationParams

PREFIX = (
    "<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt "
    "based on an image content, suitable for input to a text-to-image model.<|im_end|>\n"
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


class LongCatImagePipeline(DenoisingPipeline):
    """LongCat-Image text-to-image with true CFG and LongCat's CFG renorm."""

    family_name = "LongCat-Image"

    default_width = 1024
    default_height = 1024
    default_steps = 50
    default_true_cfg_scale = 4.5
    max_sequence_length = 512
    latent_channels = 16
    cfg_renorm_min = 0.0

    def __init__(self, model: str, state: ParallelState, dtype: torch.dtype):
        super().__init__(state, dtype)
        self.model = model
        self.transformer = self.load_transformer(LongCatImageTransformer2DModel, model)
        self.runtime = parallelize(self.transformer, state)
        self.load_flow_configs(model)
        self.multiple = self.vae_scale_factor * 2
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.multiple)
        self.vae = self.text_encoder = self.tokenizer = None
        if self.is_returning_rank:
            self._load_encoders(model)

    def _load_encoders(self, model: str) -> None:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model, subfolder="text_encoder", dtype=self.dtype
        )
        self.text_encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")

    # -- request validation ----------------------------------------------------
    def resolve(self, params: GenerationParams) -> Request:
        return self.resolve_text_to_image(params)

    # -- conditioning (returning rank only) ------------------------------------
    def _token_ids(self, text: str) -> list[int]:
        """Quoted spans character by character, the rest as usual; at most 512 ids."""
        ids: list[int] = []
        for part, quoted in split_quotation(text):
            for piece in part if quoted else [part]:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids[: self.max_sequence_length]

    def _padded(self, text: str):
        """The prompt's ids padded to 512, with the attention mask: ``(1, 512)`` each."""
        return self.tokenizer.pad(
            {"input_ids": [self._token_ids(text)]},
            max_length=self.max_sequence_length,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        """Last hidden state of the templated, padded prompt without the template: (512, D)."""
        padded = self._padded(text)
        prefix = self.tokenizer(PREFIX, add_special_tokens=False)["input_ids"]
        suffix = self.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]
        dtype = padded.input_ids.dtype
        ids = torch.cat(
            [
                torch.tensor([prefix], dtype=dtype),
                padded.input_ids,
                torch.tensor([suffix], dtype=dtype),
            ],
            dim=-1,
        )
        mask_dtype = padded.attention_mask.dtype
        mask = torch.cat(
            [
                torch.ones(1, len(prefix), dtype=mask_dtype),
                padded.attention_mask,
                torch.ones(1, len(suffix), dtype=mask_dtype),
            ],
            dim=-1,
        )
        out = self.text_encoder(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1][0, len(prefix) : -len(suffix)]
        return hidden.to(self.dtype)

    def condition(self, request: Request) -> dict[str, Any]:
        p = request.params
        cond = {"embeds": self._encode(p.prompt)}
        if request.do_cfg:
            cond["negative"] = self._encode(p.negative_prompt or "")
        return cond

    # -- the batch -------------------------------------------------------------
    def _latent_hw(self, request: Request) -> tuple[int, int]:
        return 2 * (request.height // self.multiple), 2 * (request.width // self.multiple)

    def _noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """diffusers' LongCat t2i draws float32 noise and casts it to the model dtype."""
        return torch.randn(shape, generator=generator).to(self.dtype)

    def prepare(self, requests: list[Request], conds: list[dict[str, Any]]) -> Job:
        seeds = [c["seed"] for c in conds]
        h, w = self._latent_hw(requests[0])
        c_lat = self.latent_channels
        noise = []
        for r, seed in zip(requests, seeds, strict=True):
            n = r.params.num_images
            x = self._noise((n, c_lat, h, w), torch.Generator("cpu").manual_seed(seed))
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
        t = conds[0]["embeds"].shape[0]  # 512; edit: + the vision tokens, equal per size
        inputs["txt_ids"] = prepare_pos_ids(modality_id=0, type="text", num_token=t).to(self.device)
        inputs["img_ids"] = prepare_pos_ids(
            modality_id=1, type="image", start=(t, t), height=h // 2, width=w // 2
        ).to(self.device)
        if "image_latents" in conds[0]:  # edit: the input image's tokens follow the noise
            inputs["image_latents"] = torch.cat(
                [c["image_latents"].expand(n, -1, -1) for c, n in zip(conds, counts, strict=True)]
            )
            image_ids = prepare_pos_ids(
                modality_id=2, type="image", start=(t, t), height=h // 2, width=w // 2
            ).to(self.device, torch.float64)  # float64 as in diffusers (the cat promotes)
            inputs["img_ids"] = torch.cat([inputs["img_ids"], image_ids])
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
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return Job(requests, seeds, latents, scheduler.timesteps, scheduler, inputs)

    @torch.no_grad()
    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        latents = job.latents
        hidden = latents
        if "image_latents" in job.inputs:
            hidden = torch.cat([latents, job.inputs["image_latents"]], dim=1)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep / 1000,
            encoder_hidden_states=job.inputs["text"][branch],
            txt_ids=job.inputs["txt_ids"],
            img_ids=job.inputs["img_ids"],
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]]

    def cache_adapter(self):
        return cache_adapter(self.model)

    def guide(self, positive, negative, scale):
        if negative is None:
            return positive
        combined = negative + scale * (positive - negative)
        # LongCat's CFG renorm: never above the positive prediction's per-token norm.
        cond_norm = torch.norm(positive, dim=-1, keepdim=True)
        noise_norm = torch.norm(combined, dim=-1, keepdim=True)
        ratio = (cond_norm / (noise_norm + 1e-8)).clamp(min=self.cfg_renorm_min, max=1.0)
        return combined * ratio

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
    ratio at ``target_area`` pixels (rounded up to multiples of 16; requested sizes are
    ignored); the text encoder sees the prompt with the image at half that size, and the
    embeddings keep the vision tokens; the image's VAE latents (mode,
    ``(x - shift) * scale``) follow the noise tokens with position ids of modality 2;
    CFG is plain ``neg + s * (pos - neg)`` (no renorm); noise is drawn in the model dtype.
    """

    target_area = 1024 * 1024

    def _load_encoders(self, model: str) -> None:
        super()._load_encoders(model)
        from transformers import Qwen2VLImageProcessor

        self.vision_processor = Qwen2VLImageProcessor.from_pretrained(
            model, subfolder="text_processor"
        )

    def resolve(self, params: GenerationParams) -> Request:
        if len(params.images) != 1:
            raise ValueError(
                f"{type(self).__name__} takes exactly 1 input image, got {len(params.images)}"
            )
        image = params.images[0]
        w, h = calculate_dimensions(self.target_area, image.size[0] / image.size[1])
        sized = GenerationParams(**{**params.__dict__, "images": [], "width": w, "height": h})
        request = super().resolve(sized)
        request.params = params
        return request

    def _noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=self.dtype)

    @torch.no_grad()
    def _encode_with_image(self, text: str, image: Image.Image) -> torch.Tensor:
        """Last hidden state from ``<|vision_start|>`` to the suffix: ``(V + 512, D)``."""
        vision = self.vision_processor(images=image, return_tensors="pt")
        grid = vision["image_grid_thw"]
        image_tokens = int(grid.prod()) // self.vision_processor.merge_size**2
        prefix = self.tokenizer(
            EDIT_PREFIX.replace("<|image_pad|>", "<|image_pad|>" * image_tokens),
            add_special_tokens=False,
        )["input_ids"]
        suffix = self.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]
        start = prefix.index(self.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
        padded = self._padded(text)
        ids_dtype, mask_dtype = padded.input_ids.dtype, padded.attention_mask.dtype
        ids = torch.cat(
            [
                torch.tensor(prefix, dtype=ids_dtype),
                padded.input_ids[0],
                torch.tensor(suffix, dtype=ids_dtype),
            ]
        )
        mask = torch.cat(
            [
                torch.ones(len(prefix), dtype=mask_dtype),
                padded.attention_mask[0],
                torch.ones(len(suffix), dtype=mask_dtype),
            ]
        )
        out = self.text_encoder(
            input_ids=ids[None].to(self.device),
            attention_mask=mask[None].to(self.device),
            pixel_values=vision["pixel_values"].to(self.device),
            image_grid_thw=grid.to(self.device),
            output_hidden_states=True,
        )
        return out.hidden_states[-1][0, start : -len(suffix)].to(self.dtype)

    @torch.no_grad()
    def condition(self, request: Request) -> dict[str, Any]:
        p = request.params
        w, h = request.width, request.height
        image = self.image_processor.resize(p.images[0], h, w)
        shown = self.image_processor.resize(image, h // 2, w // 2)
        cond = {"embeds": self._encode_with_image(p.prompt, shown)}
        if request.do_cfg:
            cond["negative"] = self._encode_with_image(p.negative_prompt or "", shown)
        pixels = self.image_processor.preprocess(image, h, w).to(self.device, self.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        config = self.vae.config
        latents = (latents - config.shift_factor) * config.scaling_factor
        lh, lw = latents.shape[2:]
        cond["image_latents"] = _Ref._pack_latents(latents, 1, self.latent_channels, lh, lw)
        return cond

    def guide(self, positive, negative, scale):
        return apply_guidance(positive, negative, scale)  # the edit pipeline has no renorm
