"""Qwen-Image text-to-image and edit pipelines over the shared denoising loop.

Numerics follow diffusers' ``QwenImagePipeline``, ``QwenImageEditPipeline`` and
``QwenImageEditPlusPipeline`` (reused pieces: latent packing, ``calculate_shift``,
``calculate_dimensions``, the VAE image processor, the scheduler):

- prompt: chat template, encoder's last hidden state, system turn dropped (34 / 64
  tokens), embeddings padded with a mask only when a batch mixes lengths;
- noise: ``torch.randn((num_images, 1, C, H/8, W/8), generator=cpu Generator(seed))``
  in the model dtype, then packed into 2x2 patches: what diffusers draws for a CPU
  generator, so a seed gives the same image on any layout and device;
- true CFG: on when ``true_cfg_scale > 1`` and a negative prompt is given; the combined
  prediction is rescaled to the positive prediction's norm;
- width and height are rounded down to a multiple of ``2 * vae_scale_factor`` (16 for the
  real VAE), as diffusers does; a size below one multiple is a ``ValueError``.

Placement: the text encoder, tokenizer, image processor and VAE are loaded only on the
replica's rank 0, which encodes prompts (and input images) and broadcasts the small
embeddings; every rank holds the transformer. See ``docs/models.md``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline as _Ref
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (
    calculate_dimensions as _edit_dimensions,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    calculate_dimensions as _plus_dimensions,
)
from PIL import Image

from ithaca.engine.types import GenerationParams
from ithaca.models.base import DenoisingPipeline, Job, Request
from ithaca.models.qwen_image import templates
from ithaca.models.qwen_image.cache import cache_adapter
from ithaca.models.qwen_image.transformer import QwenImageTransformer2DModel, parallelize
from ithaca.parallel import ParallelState
from ithaca.parallel.cfg import POSITIVE

logger = logging.getLogger(__name__)


def _load_config(model: str, subfolder: str) -> dict:
    """A component's config from a local directory or the hub, without loading weights."""
    cls = FlowMatchEulerDiscreteScheduler if subfolder == "scheduler" else AutoencoderKLQwenImage
    return dict(cls.load_config(model, subfolder=subfolder))


class QwenImagePipeline(DenoisingPipeline):
    """Text-to-image (``Qwen/Qwen-Image``, ``Qwen/Qwen-Image-2512``)."""

    template = templates.T2I
    default_width = 1024
    default_height = 1024
    default_steps = 50
    default_true_cfg_scale = 4.0
    max_sequence_length: int | None = 512
    """Prompt tokens kept after the system turn (the reference's default; edit: no limit)."""
    tokenizer_max_length: int | None = 1024
    """Tokens the reference tokenizes after the system turn (edit: no limit)."""
    captions_empty_prompt = False
    """Layered: an empty prompt is replaced by a caption of the input image."""

    def __init__(self, model: str, state: ParallelState, dtype: torch.dtype):
        super().__init__(state, dtype)
        self.model = model
        self._apply_checkpoint_defaults(model)
        self.transformer = QwenImageTransformer2DModel.from_pretrained(
            model, subfolder="transformer", torch_dtype=dtype
        ).to(self.device)
        self.transformer.eval().requires_grad_(False)
        if self.transformer.config.guidance_embeds:
            raise ValueError(
                f"{model}: guidance-distilled Qwen-Image transformers are not supported"
            )
        self.runtime = parallelize(self.transformer, state)
        self.scheduler_config = _load_config(model, "scheduler")
        vae_config = _load_config(model, "vae")
        self.vae_scale_factor = 2 ** len(vae_config["temperal_downsample"])
        self.latent_channels = self.transformer.config.in_channels // 4
        self.multiple = self.vae_scale_factor * 2
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.multiple)
        # Only the returning rank encodes prompts and images and decodes latents.
        self.vae = self.text_encoder = self.tokenizer = None
        if self.is_returning_rank:
            self._load_encoders(model)

    def _apply_checkpoint_defaults(self, model: str) -> None:
        """A checkpoint may state the size and steps it was trained for in
        ``model_index.json`` ``_ithaca_defaults`` (diffusers ignores ``_`` keys)."""
        path = os.path.join(model, "model_index.json")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            defaults = json.load(f).get("_ithaca_defaults", {})
        self.default_width = int(defaults.get("width", self.default_width))
        self.default_height = int(defaults.get("height", self.default_height))
        self.default_steps = int(defaults.get("num_inference_steps", self.default_steps))

    def cache_adapter(self):
        return cache_adapter(self.model)

    def _load_encoders(self, model: str) -> None:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.vae = AutoencoderKLQwenImage.from_pretrained(
            model, subfolder="vae", torch_dtype=self.dtype
        ).to(self.device)
        self.vae.eval().requires_grad_(False)
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model, subfolder="text_encoder", dtype=self.dtype
        ).to(self.device)
        self.text_encoder.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")

    # -- request validation ----------------------------------------------------
    def _size(self, params: GenerationParams, width: int, height: int) -> tuple[int, int]:
        w = params.width if params.width is not None else width
        h = params.height if params.height is not None else height
        for name, value in (("width", w), ("height", h)):
            if not isinstance(value, int) or value < self.multiple:
                raise ValueError(
                    f"{name} ({value!r}) must be an integer of at least {self.multiple} "
                    f"(sizes are rounded down to a multiple of {self.multiple})"
                )
        return w // self.multiple * self.multiple, h // self.multiple * self.multiple

    def _common(self, params: GenerationParams, width: int, height: int, extra=()) -> Request:
        if not params.prompt and not self.captions_empty_prompt:
            raise ValueError("prompt must be a non-empty string")
        steps = params.num_inference_steps
        steps = self.default_steps if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps ({steps!r}) must be a positive integer")
        if steps < 2 and self.scheduler_config.get("shift_terminal"):
            # diffusers' terminal stretch divides by (1 - last sigma) = 0 for one step: NaN.
            raise ValueError(
                f"num_inference_steps ({steps}) must be at least 2 with this scheduler "
                f"(shift_terminal={self.scheduler_config['shift_terminal']})"
            )
        if params.num_images < 1:
            raise ValueError(f"num_images ({params.num_images}) must be at least 1")
        scale = params.true_cfg_scale
        scale = self.default_true_cfg_scale if scale is None else float(scale)
        if params.guidance_scale is not None:
            logger.warning("guidance_scale is ignored: Qwen-Image is not guidance-distilled")
        w, h = self._size(params, width, height)
        do_cfg = scale > 1 and params.negative_prompt is not None
        return Request(params, w, h, steps, scale, do_cfg, params.seed, tuple(extra))

    def resolve(self, params: GenerationParams) -> Request:
        if params.images:
            raise ValueError(f"{type(self).__name__} is text-to-image and takes no input images")
        return self._common(params, self.default_width, self.default_height)

    # -- conditioning (returning rank only) ------------------------------------
    @torch.no_grad()
    def _encode(self, text: str, images: list[Image.Image] | None = None) -> torch.Tensor:
        """Encoder last hidden state of one templated prompt, system turn dropped: (T, D)."""
        vision: dict[str, torch.Tensor] = {}
        if images:
            text, vision = self._expand_vision(text, images)
        limit = {}
        if self.tokenizer_max_length is not None:
            limit = {
                "max_length": self.tokenizer_max_length + self.template.drop,
                "truncation": True,
            }
        tokens = self.tokenizer(text, return_tensors="pt", **limit).to(self.device)
        out = self.text_encoder(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            output_hidden_states=True,
            **{k: v.to(self.device) for k, v in vision.items()},
        )
        hidden = out.hidden_states[-1][0, self.template.drop :]  # (T, D)
        if self.max_sequence_length is not None:
            hidden = hidden[: self.max_sequence_length]
        return hidden.to(self.dtype)

    def _expand_vision(self, text, images):
        raise NotImplementedError

    def condition(self, request: Request) -> dict[str, Any]:
        p = request.params
        cond = {"embeds": self._encode(self.template.format(p.prompt))}
        if request.do_cfg:
            cond["negative"] = self._encode(self.template.format(p.negative_prompt))
        return cond

    # -- the batch -------------------------------------------------------------
    def _noise(self, request: Request, seed: int) -> torch.Tensor:
        """diffusers' ``prepare_latents`` for one CPU generator: packed (n, S, 4C)."""
        h = 2 * (request.height // self.multiple)
        w = 2 * (request.width // self.multiple)
        n = request.params.num_images
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(
            (n, 1, self.latent_channels, h, w), generator=generator, dtype=self.dtype
        )
        return _Ref._pack_latents(noise.to(self.device), n, self.latent_channels, h, w)

    def _text_batch(self, embeds: list[torch.Tensor], counts: list[int]):
        """Per-request (T_i, D) -> (B, T_max, D) and a (B, T_max) mask, None if unpadded."""
        rows = [e for e, n in zip(embeds, counts, strict=True) for _ in range(n)]
        t_max = max(e.shape[0] for e in rows)
        batch = torch.stack(
            [torch.cat([e, e.new_zeros(t_max - e.shape[0], e.shape[1])]) for e in rows]
        )
        mask = torch.stack([torch.arange(t_max, device=batch.device) < e.shape[0] for e in rows])
        return batch, (None if bool(mask.all()) else mask)

    def _image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        return [(1, request.height // self.multiple, request.width // self.multiple)]

    def prepare(self, requests: list[Request], conds: list[dict[str, Any]]) -> Job:
        seeds = [c["seed"] for c in conds]
        latents = torch.cat([self._noise(r, s) for r, s in zip(requests, seeds, strict=True)])
        counts = [r.params.num_images for r in requests]
        inputs: dict[str, Any] = {
            "text": {POSITIVE: self._text_batch([c["embeds"] for c in conds], counts)}
        }
        if requests[0].do_cfg:
            inputs["text"][1] = self._text_batch([c["negative"] for c in conds], counts)
        if "image_latents" in conds[0]:
            inputs["image_latents"] = torch.cat(
                [c["image_latents"].expand(n, -1, -1) for c, n in zip(conds, counts, strict=True)]
            )
        inputs["img_shapes"] = [self._image_shapes(requests[0])] * latents.shape[0]
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sigmas, mu = self._schedule(requests[0].steps, latents, inputs)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        return Job(requests, seeds, latents, scheduler.timesteps, scheduler, inputs)

    def _schedule(self, steps: int, latents: torch.Tensor, inputs: dict) -> tuple:
        """The reference's sigmas and dynamic shift ``mu`` for a batch."""
        c = self.scheduler_config
        mu = calculate_shift(
            latents.shape[1],
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        return np.linspace(1.0, 1 / steps, steps), mu

    @torch.no_grad()
    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        latents = job.latents
        hidden = latents
        if "image_latents" in job.inputs:
            hidden = torch.cat([latents, job.inputs["image_latents"]], dim=1)
        embeds, mask = job.inputs["text"][branch]
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=job.inputs["img_shapes"],
            additional_t_cond=job.inputs.get("additional_t_cond"),  # Layered: RGB vs RGBA
            attention_kwargs={},
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]]

    @torch.no_grad()
    def decode(self, job: Job, latents: torch.Tensor) -> list[list[Image.Image]]:
        r = job.requests[0]
        latents = _Ref._unpack_latents(latents, r.height, r.width, self.vae_scale_factor)
        latents = latents.to(self.vae.dtype)
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
        latents = latents / inv_std + mean
        images = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        flat = self.image_processor.postprocess(images, output_type="pil")
        out, start = [], 0
        for req in job.requests:
            out.append(flat[start : start + req.params.num_images])
            start += req.params.num_images
        return out


class QwenImageEditPipeline(QwenImagePipeline):
    """Image editing with one input image (``Qwen/Qwen-Image-Edit``)."""

    template = templates.EDIT
    max_images = 1
    max_sequence_length = None
    tokenizer_max_length = None

    def _load_encoders(self, model: str) -> None:
        super()._load_encoders(model)
        from transformers import AutoTokenizer, Qwen2VLImageProcessor

        # The processor's two parts, used directly: Qwen2VLProcessor itself also builds a
        # video processor, which needs torchvision.
        self.vision_processor = Qwen2VLImageProcessor.from_pretrained(model, subfolder="processor")
        self.tokenizer = AutoTokenizer.from_pretrained(model, subfolder="processor")

    def _expand_vision(self, text: str, images: list[Image.Image]):
        """What Qwen2VLProcessor does: pixel values, and one pad token per merged patch."""
        vision = self.vision_processor(images=images, return_tensors="pt")
        merge = self.vision_processor.merge_size**2
        pad = "<|image_pad|>"
        parts = text.split(pad)
        assert len(parts) == len(images) + 1, (len(parts), len(images))
        counts = [int(g.prod()) // merge for g in vision["image_grid_thw"]]
        text = parts[0] + "".join(pad * n + part for n, part in zip(counts, parts[1:], strict=True))
        return text, {
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }

    def _dims(self, image: Image.Image, area: int) -> tuple[int, int]:
        return _edit_dimensions(area, image.size[0] / image.size[1])[:2]

    def resolve(self, params: GenerationParams) -> Request:
        if not params.images:
            raise ValueError(f"{type(self).__name__} needs an input image")
        if len(params.images) > self.max_images:
            raise ValueError(
                f"{type(self).__name__} takes {self.max_images} input image, got "
                f"{len(params.images)} (use Qwen-Image-Edit-2509 for several)"
            )
        images = params.images
        sizes = [self._vae_size(im) for im in images]
        w, h = self._dims(images[-1 if self.max_images > 1 else 0], self._edit_area())
        return self._common(params, w, h, extra=tuple(sizes))

    def _vae_size(self, image: Image.Image) -> tuple[int, int]:
        return self._dims(image, self._edit_area())

    def _edit_area(self) -> int:
        # diffusers' 1024 * 1024, or the trained size a checkpoint states (_ithaca_defaults)
        return self.default_width * self.default_height

    def _image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        shapes = super()._image_shapes(request)
        return shapes + [(1, h // self.multiple, w // self.multiple) for w, h in request.extra_key]

    @torch.no_grad()
    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, 1, H, W) in [-1, 1] -> packed normalised latents (1, S, 4C)."""
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
        latents = (latents - mean) / std
        h, w = latents.shape[3:]
        return _Ref._pack_latents(latents, 1, self.latent_channels, h, w)

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
        cond = {"embeds": self._encode(self.template.format(self._user_turn(p.prompt, n)), shown)}
        if request.do_cfg:
            negative = self.template.format(self._user_turn(p.negative_prompt, n))
            cond["negative"] = self._encode(negative, shown)
        cond["image_latents"] = torch.cat([self._encode_image(px) for px in pixels], dim=1)
        return cond


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Image editing with one or more input images (``Qwen/Qwen-Image-Edit-2509``)."""

    template = templates.EDIT_PLUS
    max_images = 16

    def _dims(self, image: Image.Image, area: int) -> tuple[int, int]:
        return _plus_dimensions(area, image.size[0] / image.size[1])

    def _vae_size(self, image: Image.Image) -> tuple[int, int]:
        return self._dims(image, VAE_IMAGE_SIZE)

    def _condition_images(self, request: Request):
        shown, pixels = [], []
        for image, (w, h) in zip(request.params.images, request.extra_key, strict=True):
            cw, ch = self._dims(image, CONDITION_IMAGE_SIZE)
            shown.append(self.image_processor.resize(image, ch, cw))
            pixels.append(self.image_processor.preprocess(image, h, w).unsqueeze(2))
        return shown, pixels

    def _user_turn(self, prompt: str, num_images: int) -> str:
        return templates.edit_plus_user_turn(num_images, prompt)
