"""The flow-matching pipeline every image family stands on, built from its :class:`FamilySpec`.

:class:`FlowMatchPipeline` loads the transformer and parallelizes it as the spec says,
loads the returning rank's components from the checkpoint's own ``model_index.json``,
resolves requests by one rule per field, draws the seeded noise, batches the prompt
embeddings, schedules (``calculate_shift`` + sigmas), calls the transformer and
decodes. A family writes:

- ``encode_prompt(text) -> tensor | dict of tensors`` (returning rank only): the
  ``encoder_hidden_states``, or the transformer's text arguments by name
  (:meth:`~FlowMatchPipeline.text_hidden` is the chat-template families' encoder call);
- ``forward_inputs(requests, conds, latents)``: its other arguments (position ids ...);
- an edit model: ``encode_images(request)``, what it makes of the input images;

and, only where its reference differs, ``forward`` (Z-Image, Wan2.2), ``timestep``, the
spec's guidance rule, ``checkpoint_spec`` (what a checkpoint changes in the spec),
``load_transformers`` (Wan2.2's two experts) or ``latent_shape`` (a frame axis).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline as _Packing
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from ithaca.cache import checkpoint_coefficients
from ithaca.models.base import DenoisingPipeline, seeded_noise, split_images
from ithaca.models.registry import model_index
from ithaca.models.spec import DEFAULTS, FamilySpec
from ithaca.parallel import ParallelState
from ithaca.parallel.cfg import NEGATIVE, POSITIVE
from ithaca.runtime.loop import Job, Request
from ithaca.runtime.parallelize import parallelize
from ithaca.types import GenerationParams, ParamError

logger = logging.getLogger(__name__)

pack_latents = _Packing._pack_latents
"""``(n, C, h, w)`` -> ``(n, h/2 * w/2, 4C)``: 2x2 patches as tokens (diffusers')."""
unpack_latents = _Packing._unpack_latents


def load_part(model: str, name: str, index: dict, device, dtype):
    """One checkpoint component by the class its ``model_index.json`` names: modules
    frozen on ``device`` in ``dtype``; tokenizers and processors as they are."""
    library, class_name = index[name]
    cls = getattr(importlib.import_module(library), class_name)
    if not issubclass(cls, torch.nn.Module):
        return cls.from_pretrained(model, subfolder=name)
    kwarg = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
    module = cls.from_pretrained(model, subfolder=name, **{kwarg: dtype})
    return module.to(device).eval().requires_grad_(False)


def reference_pipeline(cls: type):
    """diffusers pipeline ``cls`` built without components: what its ``__init__`` sets
    (prompt templates, their token counts) is read from it rather than copied."""
    return cls(**dict.fromkeys(inspect.signature(cls).parameters))


def repeat_rows(values: list, requests: list[Request]) -> list:
    """One entry per request -> one per image row of the batch."""
    return [v for v, r in zip(values, requests, strict=True) for _ in range(r.params.num_images)]


def vae_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Wan-style VAE's per-channel latent mean and std, ``(1, z, 1, 1, 1)`` each, in
    ``like``'s dtype and device (Qwen-Image's VAE and Wan2.2's)."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(like)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(like)
    return mean, std


def decode_3d(vae, latents: torch.Tensor) -> torch.Tensor:
    """A Wan-style causal 3D VAE's decode (Wan2.2's, Qwen-Image's): normalised latents
    ``(B, z, F, h, w)`` -> pixels ``(B, C, F', H, W)`` in [-1, 1], the per-channel
    normalisation undone in the VAE's dtype as the references do (``x / (1 / std) + mean``)."""
    latents = latents.to(vae.dtype)
    mean, std = vae_stats(vae, latents)
    return vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]


def flow_schedule(config, steps: int, seq_len: int, device, sigmas="linspace", cls=None, **kw):
    """The reference's scheduler for ``steps``: ``cls`` (default
    ``FlowMatchEulerDiscreteScheduler``) from ``config`` with overrides ``kw`` (Wan2.2's
    ``flow_shift``), dynamic shift ``mu`` from the image sequence length
    (``calculate_shift``) where the config asks for it, and the family's sigmas (see
    :attr:`FamilySpec.sigmas`). Returns the scheduler, timesteps set on ``device``."""
    cls = cls or FlowMatchEulerDiscreteScheduler
    scheduler = cls.from_config(config, **kw)
    c = scheduler.config
    kwargs: dict[str, Any] = {}
    if c.use_dynamic_shifting:
        kwargs["mu"] = calculate_shift(
            seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
        )
    if sigmas == "torch_linspace":
        kwargs["sigmas"] = torch.linspace(1.0, 1 / steps, steps).tolist()
    elif sigmas == "linspace" and not c.get("use_flow_sigmas", False):
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if "sigmas" not in kwargs:
        kwargs["num_inference_steps"] = steps
    scheduler.set_timesteps(device=device, **kwargs)
    return scheduler


class FlowMatchPipeline(DenoisingPipeline):
    """The shared pipeline of a :class:`FamilySpec` (see the module docstring)."""

    spec: FamilySpec
    output_kind: str = "image"
    """What the family makes ("video": Wan2.2), as error messages name it."""
    guidance_embeds: bool = False
    """Whether the transformer takes ``guidance_scale`` as an input (FLUX.1-dev); else,
    unless the spec's ``cfg_aliases`` makes it the CFG scale, it is ignored with a warning."""

    def __init__(self, model: str, state: ParallelState, dtype: torch.dtype):
        super().__init__(state, dtype)
        self.model = model
        self.index = model_index(model)
        self.spec = spec = self.checkpoint_spec(model)
        self.guide = spec.guidance
        # The spec's defaults, then the checkpoint's, by request field (other keys are not ours)
        for key, value in {**spec.defaults, **(self.index.get("_ithaca_defaults") or {})}.items():
            if key in DEFAULTS:
                setattr(self, DEFAULTS[key], value)
        self.load_transformers(model)
        scheduler = spec.scheduler or FlowMatchEulerDiscreteScheduler
        self.scheduler_config = dict(scheduler.load_config(model, subfolder="scheduler"))
        self.vae_scale_factor = self.vae_scale(model)
        channels = self.transformer.config.in_channels
        self.latent_channels = channels // 4 if spec.packed else channels
        self.multiple = self.vae_scale_factor * 2
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.multiple)
        for name in spec.components:
            setattr(self, name, None)
        if self.is_returning_rank:  # only the returning rank encodes and decodes
            self.load_components(model)
            self.offloading.place_components({n: getattr(self, n) for n in spec.components})
        elif self.decodes:  # vae_patch_parallel_size > 1: its VAE group splits the decode
            self.vae = load_part(model, "vae", self.index, self.device, self.part_dtype("vae"))

    def checkpoint_spec(self, model: str) -> FamilySpec:
        """The spec for this checkpoint (``self.index`` is read): the class's, unless a
        family's checkpoints differ in what it declares (Wan2.2: TI2V-5B's defaults and
        per-token timesteps, which input images a checkpoint takes)."""
        return self.spec

    def load_transformers(self, model: str) -> None:
        """The transformer: loaded, parallelized by the spec, placed (Wan2.2: its experts)."""
        spec = self.spec
        self.transformer = self.load_transformer(spec.transformer, model)
        self.runtime = parallelize(self.transformer, self.state, spec.attention)
        self.offloading.place_transformer("transformer", self.transformer, spec.attention.blocks)

    def part_dtype(self, name: str) -> torch.dtype:
        """The dtype component ``name`` is loaded in (the spec's ``vae_dtype`` for the VAE)."""
        return (name == "vae" and self.spec.vae_dtype) or self.dtype

    def vae_scale(self, model: str) -> int:
        """Pixels per latent (an ``AutoencoderKL``: 2 ** (stages - 1); a Wan-style VAE,
        Qwen-Image's: 2 ** its temporal stages, each halving height and width too)."""
        library, class_name = self.index["vae"]
        cls = getattr(importlib.import_module(library), class_name)
        config = cls.load_config(model, subfolder="vae")
        if "temperal_downsample" in config:
            return 2 ** len(config["temperal_downsample"])
        return 2 ** (len(config["block_out_channels"]) - 1)

    def load_components(self, model: str) -> None:
        for name in self.spec.components:
            device = self.offloading.component_device(name)
            setattr(self, name, load_part(model, name, self.index, device, self.part_dtype(name)))

    def lora_loader(self):
        """The reference pipeline class (its ``lora_state_dict`` converters), if it has
        LoRA support; else adapters load in the diffusers/PEFT key layout only."""
        import diffusers

        return getattr(diffusers, self.spec.reference or type(self).__name__, None)

    def cache_adapter(self):
        adapter = self.spec.cache_adapter
        if adapter is None:
            return super().cache_adapter()
        if callable(adapter):
            return adapter(self.model)
        fitted = checkpoint_coefficients(self.model, adapter.teacache_coefficients)
        return dataclasses.replace(adapter, teacache_coefficients=fitted)

    # -- requests ------------------------------------------------------------------
    def cfg_scale(self, params: GenerationParams) -> float:
        """The request's CFG scale, accepting diffusers' name for it where the spec says."""
        scale = params.true_cfg_scale
        if self.spec.cfg_aliases and params.guidance_scale is not None:
            if scale is not None and float(scale) != float(params.guidance_scale):
                raise ParamError(
                    "guidance_scale",
                    f"{self.spec.name} has one guidance scale: true_cfg_scale ({scale}) and "
                    f"guidance_scale ({params.guidance_scale}) differ",
                )
            scale = params.guidance_scale
        elif params.guidance_scale is not None and not self.guidance_embeds:
            logger.warning(
                "guidance_scale is ignored: %s is not guidance-distilled", self.spec.name
            )
        return self.default_true_cfg_scale if scale is None else float(scale)

    def request_size(self, params: GenerationParams) -> tuple[int, int]:
        """Output ``(width, height)``: the request's, else the default; an edit model's
        default (:attr:`FamilySpec.edit_size`) is its last input image's :meth:`input_size`."""
        w, h = params.width, params.height
        if params.images and self.spec.edit_size:
            iw, ih = self.input_size(params.images[-1])
            w, h = iw if w is None else w, ih if h is None else h
        return self.rounded_size(w, h)

    def input_size(self, image: Image.Image, area: int | None = None) -> tuple[int, int]:
        """``image``'s aspect ratio at ``area`` px (default: the default size's area), as
        the reference sizes it (:attr:`FamilySpec.edit_size`)."""
        area = area or self.default_width * self.default_height
        return self.spec.edit_size(area, image.size[0] / image.size[1])

    def extra_key(self, params: GenerationParams) -> tuple:
        """Family settings two requests must share to run in one batch."""
        return ()

    def resolve(self, params: GenerationParams) -> Request:
        steps = self.checked_steps(params)
        fewest, most = self.spec.images
        count = len(params.images)
        if not fewest <= count <= most:
            wanted = _images_wanted(fewest, most, self.output_kind)
            raise ParamError("image", f"{self.spec.name} {wanted}, got {count}")
        if steps < 2 and self.scheduler_config.get("shift_terminal"):
            # diffusers' terminal stretch divides by (1 - last sigma) = 0 for one step: NaN.
            raise ParamError(
                "num_inference_steps",
                f"num_inference_steps ({steps}) must be at least 2 with this scheduler "
                f"(shift_terminal={self.scheduler_config['shift_terminal']})",
            )
        scale = self.cfg_scale(params)
        do_cfg = scale > self.spec.cfg_above
        if self.spec.cfg_needs_negative:
            do_cfg = do_cfg and params.negative_prompt is not None
        w, h = self.request_size(params)
        extra, lora = self.extra_key(params), self.resolve_lora(params)
        return Request(params, w, h, steps, scale, do_cfg, params.seed, extra, lora)

    # -- conditioning (returning rank only) ----------------------------------------
    def encode_prompt(self, text: str):
        raise NotImplementedError

    def tokens(self, text: str, length: int | None = None, tokenizer=None, **kwargs):
        """``text`` padded (and truncated) to ``length`` tokens (default: the tokenizer's
        maximum) by ``tokenizer`` (default: ``self.tokenizer``), on this rank's device:
        ``input_ids`` and ``attention_mask`` ``(1, length)``."""
        tokenizer = tokenizer or self.tokenizer
        length = length or tokenizer.model_max_length
        return tokenizer(text, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt", **kwargs).to(self.device)  # fmt: skip

    def chat(self, content: str, **kwargs) -> str:
        """``content`` as one user turn of the tokenizer's chat template, with the
        generation prompt (``kwargs``: the template's switches, e.g. ``enable_thinking``)."""
        turn = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            turn, tokenize=False, add_generation_prompt=True, **kwargs
        )

    @torch.no_grad()
    def text_hidden(self, tokens, keep=slice(None), layer=-1, pads="keep", **vision):
        """The text encoder's hidden state ``layer`` of one tokenized prompt
        (``input_ids``, ``attention_mask`` ``(1, L)``; ``vision``: the encoder's image
        inputs) -> ``(T, D)`` in the model dtype: padding tokens kept, zeroed (``"zero"``)
        or removed (``"drop"``), then the tokens ``keep`` (the prompt without its template:
        the template tokens of the chat-template families are dropped here)."""
        mask = tokens["attention_mask"]
        vision = {k: v.to(self.device) for k, v in vision.items()}
        out = self.text_encoder(input_ids=tokens["input_ids"], attention_mask=mask,
                                output_hidden_states=True, **vision)  # fmt: skip
        hidden = out.hidden_states[layer][0]  # (L, D)
        if pads == "zero":
            hidden = hidden * mask[0, :, None]
        elif pads == "drop":
            hidden = hidden[mask[0].bool()]
        return hidden[keep].to(self.dtype)

    def expand_vision(self, text: str, images: list[Image.Image]) -> tuple[str, dict]:
        """What ``Qwen2VLProcessor`` does for a Qwen2-VL text encoder (Qwen-Image edits,
        LongCat-Image-Edit): ``text`` with each ``<|image_pad|>`` repeated once per merged
        patch of its image, and the encoder's ``pixel_values`` and ``image_grid_thw``."""
        vision = self.vision_processor(images=images, return_tensors="pt")
        grids, merge = vision["image_grid_thw"], self.vision_processor.merge_size**2
        pad = "<|image_pad|>"
        parts = text.split(pad)
        assert len(parts) == len(images) + 1, (len(parts), len(images))
        counts = [int(g.prod()) // merge for g in grids]
        text = parts[0] + "".join(pad * n + part for n, part in zip(counts, parts[1:], strict=True))
        return text, {"pixel_values": vision["pixel_values"], "image_grid_thw": grids}

    def encode_images(self, request: Request) -> tuple[list[Image.Image] | None, dict]:
        """What the model makes of a request's input images: the images as its text
        encoder sees them (None: it sees none), passed on as ``encode_prompt(text, shown)``,
        and condition entries (an edit's ``image_latents``: :meth:`image_tokens`)."""
        return None, {}

    @torch.no_grad()
    def condition(self, request: Request) -> dict[str, Any]:
        """The prompt's encoding (with CFG the negative prompt's too), after what
        :meth:`encode_images` makes of the input images."""
        p = request.params
        shown, cond = self.encode_images(request) if p.images else (None, {})
        vision = () if shown is None else (shown,)
        cond["positive"] = self.encode_prompt(p.prompt, *vision)
        if request.do_cfg:
            cond["negative"] = self.encode_prompt(p.negative_prompt or "", *vision)
        return cond

    # -- the batch -----------------------------------------------------------------
    def latent_hw(self, request: Request) -> tuple[int, int]:
        """Latent height and width (before packing; sizes are multiples of ``multiple``)."""
        return request.height // self.vae_scale_factor, request.width // self.vae_scale_factor

    def latent_shape(self, request: Request) -> tuple[int, ...]:
        """One image's noise shape before packing: ``(C, h, w)`` (video: ``(C, F, h, w)``)."""
        return (self.latent_channels, *self.latent_hw(request))

    def initial_latents(self, requests: list[Request], seeds: list[int]) -> torch.Tensor:
        """Each request's seeded noise, packed if the spec says so, concatenated."""
        shape = self.latent_shape(requests[0])
        dtype = self.spec.noise_dtype or self.dtype
        noise = []
        for r, seed in zip(requests, seeds, strict=True):
            n = r.params.num_images
            x = seeded_noise((n, *shape), seed, dtype, self.device)
            x = x.to(self.spec.latents_dtype or self.dtype)
            noise.append(pack_latents(x, n, *shape) if self.spec.packed else x)
        return torch.cat(noise)

    def batch_text(self, embeds: list, requests: list[Request]):
        """Per-request prompt encodings -> the batch's (one row per image): tensors
        stacked, dicts of tensors stacked per key."""
        rows = repeat_rows(embeds, requests)
        if isinstance(rows[0], dict):
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return torch.stack(rows)

    def seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens per row, for the dynamic shift."""
        if self.spec.packed:
            return latents.shape[1]
        return latents.shape[-2] * latents.shape[-1] // 4  # 2x2 patches

    def forward_inputs(self, requests: list[Request], conds: list[dict], latents) -> dict:
        """The transformer's keyword arguments beyond the latents, timestep and text
        (position ids, ...); ``image_latents`` (:meth:`image_tokens`) follow the noise."""
        return {}

    def image_tokens(self, requests: list[Request], conds: list[dict], inputs: dict) -> None:
        """Edit models: each request's packed input-image latents ``(1, S_image, C)``, one
        row per image of the batch, as ``inputs["image_latents"]`` (see :meth:`with_image`)."""
        if "image_latents" in conds[0]:
            rows = [c["image_latents"].expand(r.params.num_images, -1, -1)
                    for c, r in zip(conds, requests, strict=True)]  # fmt: skip
            inputs["image_latents"] = torch.cat(rows)

    @staticmethod
    def with_image(job: Job) -> torch.Tensor:
        """The transformer's tokens: the noise ``(B, S, C)``, followed for an edit by the
        input image's ``(B, S + S_image, C)`` (the prediction is the first ``S``)."""
        if "image_latents" not in job.inputs:
            return job.latents
        return torch.cat([job.latents, job.inputs["image_latents"]], dim=1)

    def prepare(self, requests: list[Request], conds: list[dict[str, Any]]) -> Job:
        seeds = [c["seed"] for c in conds]
        latents = self.initial_latents(requests, seeds)
        text = {POSITIVE: self.batch_text([c["positive"] for c in conds], requests)}
        if requests[0].do_cfg:
            text[NEGATIVE] = self.batch_text([c["negative"] for c in conds], requests)
        inputs = {"text": text, **self.forward_inputs(requests, conds, latents)}
        scheduler = self.schedule(requests[0].steps, latents, inputs)
        return Job(requests, seeds, latents, scheduler.timesteps, scheduler, inputs)

    def schedule(self, steps: int, latents: torch.Tensor, inputs: dict):
        """The batch's scheduler, timesteps set (see :func:`flow_schedule`)."""
        spec = self.spec
        seq_len = self.seq_len(latents)
        return flow_schedule(
            self.scheduler_config, steps, seq_len, self.device, spec.sigmas, spec.scheduler
        )

    def timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep for scheduler time ``t``: ``(B,)`` in the latents'
        dtype, over 1000."""
        return t.expand(latents.shape[0]).to(latents.dtype) / 1000

    def forward(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        """The noise tokens' prediction: the transformer on :meth:`with_image`'s tokens, the
        :meth:`timestep`, the branch's text (a tensor: ``encoder_hidden_states``; a dict:
        keyword arguments) and every other input of :meth:`forward_inputs` by name."""
        text = job.inputs["text"][branch]
        text = text if isinstance(text, dict) else {"encoder_hidden_states": text}
        rest = {k: v for k, v in job.inputs.items() if k not in ("text", "image_latents")}
        out = self.transformer(hidden_states=self.with_image(job),
                               timestep=self.timestep(t, job.latents), **text, **rest,
                               return_dict=False)[0]  # fmt: skip
        return out[:, : job.latents.shape[1]]

    @torch.no_grad()
    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        return self.forward(job, branch, t)

    # -- decoding (returning rank only) --------------------------------------------
    @torch.no_grad()
    def decode(self, job: Job, latents: torch.Tensor) -> list[list[Image.Image]]:
        """Loop latents unpacked, unscaled and shifted, decoded, split per request."""
        if self.spec.packed:
            r = job.requests[0]
            latents = unpack_latents(latents, r.height, r.width, self.vae_scale_factor)
        latents, config = latents.to(self.vae.dtype), self.vae.config
        if "temperal_downsample" in config:  # a Wan-style 3D VAE (Qwen-Image's): one frame
            images = decode_3d(self.vae, latents.unsqueeze(2))[:, :, 0]
        else:
            latents = latents / config.scaling_factor + config.shift_factor
            images = self.vae.decode(latents, return_dict=False)[0]
        flat = self.image_processor.postprocess(images, output_type="pil")
        return split_images(flat, job.requests)


def _images_wanted(fewest: int, most: int, kind: str) -> str:
    if most == 0:
        return f"is text-to-{kind} and takes no input images"
    if fewest == 0:
        return f"takes at most {'one' if most == 1 else most} input image{'s' * (most > 1)}"
    if fewest == most:
        return f"needs exactly {'one' if most == 1 else most} input image{'s' * (most > 1)}"
    return f"takes {fewest} to {most} input images"
