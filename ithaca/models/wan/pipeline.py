"""Wan2.2 text/image-to-video pipelines on the shared flow-matching pipeline.

Numerics follow diffusers' ``WanPipeline`` (T2V-A14B with ``transformer_2`` and
``boundary_ratio``; TI2V-5B with ``expand_timesteps``) and ``WanImageToVideoPipeline``
(I2V-A14B; TI2V-5B with an input image):

- prompt: cleaned as diffusers does (``prompt_clean``), UMT5 last hidden state of the
  512 tokens, zero past the real ones, without a mask (the model was trained so);
- noise: ``torch.randn((1, z, (F-1)/4+1, H/s, W/s), generator=cpu Generator(seed))`` in
  fp32, what diffusers draws for a CPU generator; latents stay fp32, the transformer
  input is cast to the model dtype;
- experts: the first transformer while ``t >= boundary_ratio * 1000`` with
  ``guidance_scale``, then ``transformer_2`` with ``guidance_scale_2`` (default: the
  first scale). CFG (``guidance_scale > 1``, negative prompt default ``""``) combines
  ``negative + scale * (positive - negative)`` without Qwen-Image's norm rescale;
- I2V-A14B: the input image followed by ``F-1`` black frames is VAE-encoded; the
  transformer sees ``[noise, first-frame mask (4 channels), condition latents]``;
- TI2V-5B (``expand_timesteps``): one timestep per token (0 on the first latent frame
  when an image is given, whose latents replace the noise there at every step);
- scheduler: the checkpoint's ``UniPCMultistepScheduler`` with the request's
  ``flow_shift``; ``num_frames`` must be ``4k+1``; width and height are rounded down to a
  multiple of ``vae_scale * patch`` (16, or 32 for TI2V-5B) as diffusers does.

Placement: tokenizer, text encoder and VAE (fp32, as diffusers' Wan examples load it)
live on the replica's rank 0 only; every rank holds the experts, each sharded by the
same ``_sp_plan``. The idle expert can live in host memory (``expert_offload``, see
:class:`ithaca.runtime.offload.ExpertPlacement` and ``docs/video.md``). Outputs are uint8 frames
``(F, H, W, 3)``; MP4 encoding is the server's, once, after ``generate`` returns.

The shared flow-matching pipeline (:mod:`ithaca.models.flow`) does the rest from
:data:`SPEC`; this module writes the experts, the video settings, the prompt padding, the
image condition, the forward and the video decode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.video_processor import VideoProcessor
from PIL import Image

from ithaca.cache import CacheGroup, build_cache
from ithaca.config import CacheConfig
from ithaca.models.flow import FlowMatchPipeline, decode_3d, flow_schedule, vae_stats
from ithaca.models.spec import FamilySpec
from ithaca.models.wan.cache import WAN_CACHE
from ithaca.models.wan.transformer import WanTransformer3DModel, wan_attention
from ithaca.parallel import ParallelState
from ithaca.runtime.loop import Job, Request
from ithaca.runtime.parallelize import parallelize
from ithaca.types import GenerationParams, GenerationResult, ParamError

MAX_SEQUENCE_LENGTH = 512
"""Text tokens the transformer sees (the reference pads every prompt to this)."""

T2V_DEFAULTS = {"width": 1280, "height": 720, "num_inference_steps": 40,
                "guidance_scale": 4.0, "num_frames": 81, "fps": 16}  # fmt: skip
"""T2V-A14B's published defaults."""
I2V_DEFAULTS = {**T2V_DEFAULTS, "width": 832, "height": 480, "guidance_scale": 3.5}
"""I2V-A14B's."""

SPEC = FamilySpec(
    name="Wan2.2",
    transformer=WanTransformer3DModel,
    attention=wan_attention(per_token_timesteps=False),
    cache_adapter=WAN_CACHE,
    defaults=T2V_DEFAULTS,
    cfg_aliases=False,  # the scale is guidance_scale (WanPipeline.cfg_scale)
    packed=False,
    noise_dtype=torch.float32,
    latents_dtype=torch.float32,
    sigmas="scheduler",
    reference="WanPipeline",  # its LoRA converters read both classes' files
    scheduler=UniPCMultistepScheduler,
    vae_dtype=torch.float32,
)
"""Wan2.2 T2V-A14B (two experts); :func:`WanPipeline.checkpoint_spec` adapts it to the
checkpoint (TI2V-5B, I2V-A14B)."""

TI2V_DEFAULTS = {"width": 1280, "height": 704, "num_inference_steps": 50,
                 "guidance_scale": 5.0, "num_frames": 121, "fps": 24}  # fmt: skip
"""TI2V-5B's published defaults."""


@dataclass(frozen=True)
class VideoSettings:
    """Per-request settings two requests must share to be denoised in one batch."""

    num_frames: int
    guidance_scale_2: float | None
    flow_shift: float
    image: bool
    """Whether the request gives an input image (its condition is the output's size)."""


class WanPipeline(FlowMatchPipeline):
    """Text-to-video (T2V-A14B, two experts) and text(+image)-to-video (TI2V-5B)."""

    spec = SPEC
    output_kind = "video"
    joins_mid_run = False  # the experts and scales are decided per step of one schedule

    def __init__(
        self,
        model: str,
        state: ParallelState,
        dtype: torch.dtype,
        expert_offload: bool | None = None,
    ):
        self.expert_offload = expert_offload  # read by load_transformers
        super().__init__(model, state, dtype)
        _, self.patch, patch_w = self.experts[0].config.patch_size  # (t, h, w)
        assert self.patch == patch_w, self.experts[0].config.patch_size
        self.latent_channels = self.vae_config["z_dim"]
        self.scale_temporal = self.vae_config.get("scale_factor_temporal", 4)
        self.multiple = self.vae_scale_factor * self.patch
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)

    def checkpoint_spec(self, model: str) -> FamilySpec:
        """TI2V-5B (``expand_timesteps``): its defaults, per-token timesteps sharded with
        the tokens, an optional input image; I2V-A14B (the transformer takes condition
        channels) and :class:`WanImageToVideoPipeline`: exactly one input image."""
        index = self.index
        if index.get("image_encoder", [None])[0] is not None:
            raise ValueError(f"{model}: Wan2.1 I2V (CLIP image encoder) is not supported")
        self.boundary_ratio = index.get("boundary_ratio")
        self.expand_timesteps = bool(index.get("expand_timesteps", False))
        self.vae_config = AutoencoderKLWan.load_config(model, subfolder="vae")
        spec = self.spec
        if self.expand_timesteps:
            attention = wan_attention(per_token_timesteps=True)
            images = (spec.images[0], 1)
            return dataclasses.replace(spec, attention=attention, defaults=TI2V_DEFAULTS,
                                       images=images)  # fmt: skip
        config = WanTransformer3DModel.load_config(model, subfolder="transformer")
        if config["in_channels"] != self.vae_config["z_dim"]:  # I2V-A14B: condition channels
            return dataclasses.replace(spec, images=(1, 1))
        return spec

    def load_transformers(self, model: str) -> None:
        """Both experts where the checkpoint has them, each sharded by the same plans
        with its own runtime (hooks), placed by ``Placement.place_experts``."""
        names = [n for n in ("transformer", "transformer_2") if self.index.get(n, [None])[0]]
        if len(names) == 2 and self.boundary_ratio is None:
            raise ValueError(f"{model}: two transformers but no boundary_ratio in model_index")
        # Unsharded experts load to the host: ExpertPlacement moves (or offloads) them;
        # with use_hsdp each rank holds 1/shard of each, on the device.
        where = self.device if self.state.config.use_hsdp else "cpu"
        cls = self.spec.transformer
        self.experts = [self.load_transformer(cls, model, n, where) for n in names]
        # Before placement: it keeps each expert's tensors as tensor parallel leaves them.
        layout = self.spec.attention
        self.runtimes = [parallelize(e, self.state, layout) for e in self.experts]
        self.transformer, self.runtime = self.experts[0], self.runtimes[0]
        experts = dict(zip(names, self.experts, strict=True))
        self.placement = self.offloading.place_experts(experts, layout.blocks, self.expert_offload)

    def vae_scale(self, model: str) -> int:
        return self.vae_config.get("scale_factor_spatial", 8)

    def lora_targets(self) -> dict[str, torch.nn.Module]:
        """Both experts by name (a request's LoRA ``expert``); one: ``transformer``.
        With expert offload the adapters' small tensors follow their expert on and off
        the device (:class:`ExpertPlacement` keeps the weights by identity)."""
        names = ("high_noise", "low_noise") if len(self.experts) == 2 else ("transformer",)
        return dict(zip(names, self.experts, strict=True))

    def lora_fusable(self) -> bool:
        """Not with expert offload: activating an expert copies its unmerged host weights."""
        return not self.placement.offload

    def make_cache(self, config: CacheConfig) -> CacheGroup:
        """One cache per expert, each over its own blocks and its own plan's padding."""
        adapter, experts = self.cache_adapter(), zip(self.experts, self.runtimes, strict=True)
        return CacheGroup([build_cache(config, e, adapter, self.state, r) for e, r in experts])

    # -- request validation (after GenerationParams.check) ------------------------
    def cfg_scale(self, params: GenerationParams) -> float:
        """``guidance_scale`` (CFG above 1); ``true_cfg_scale`` is an error."""
        if params.true_cfg_scale is not None:
            raise ParamError(
                "true_cfg_scale",
                "true_cfg_scale is a Qwen-Image parameter; Wan uses guidance_scale",
            )
        scale = params.guidance_scale
        return float(self.default_true_cfg_scale if scale is None else scale)

    def extra_key(self, params: GenerationParams) -> tuple:
        """The request's :class:`VideoSettings` (two requests must share them);
        ``num_frames`` must be ``4k+1`` (``k``: the VAE's temporal compression)."""
        scale_2 = params.guidance_scale_2
        if scale_2 is not None and len(self.experts) == 1:
            raise ParamError(
                "guidance_scale_2", "guidance_scale_2 needs a two-expert (A14B) checkpoint"
            )
        if len(self.experts) == 2:
            scale_2 = float(self.cfg_scale(params) if scale_2 is None else scale_2)
        shift = params.flow_shift
        shift = self.scheduler_config.get("flow_shift", 1.0) if shift is None else shift
        n = self.default_num_frames if params.num_frames is None else params.num_frames
        k = self.scale_temporal
        if (n - 1) % k:
            below = (n - 1) // k * k + 1
            raise ParamError(
                "num_frames",
                f"num_frames ({n}) must be {k}k+1 (1, {k + 1}, {2 * k + 1}, ..., 81): the "
                f"Wan VAE compresses time {k}x after the first frame; nearest valid: "
                f"{below} or {below + k}",
            )
        return (VideoSettings(n, scale_2, float(shift), bool(params.images)),)

    # -- conditioning (returning rank only) ------------------------------------
    def encode_prompt(self, text: str) -> torch.Tensor:
        """UMT5 last hidden state, zero past the real tokens: (512, D), as the reference
        pads each prompt's own states."""
        return self.text_hidden(self.tokens(prompt_clean(text), MAX_SEQUENCE_LENGTH), pads="zero")

    @torch.no_grad()
    def condition(self, request: Request) -> dict[str, Any]:
        """The prompts' states and the input image's condition (``"image"``, fp32): TI2V
        its normalised latents (1, z, 1, h, w); I2V-A14B the first-frame mask and the
        latents of the image followed by F-1 black frames (1, 4 + z, F_lat, h, w)."""
        cond = super().condition(request)
        if not request.params.images:
            return cond
        settings: VideoSettings = request.extra_key[0]
        w, h = request.width, request.height
        image = request.params.images[0].convert("RGB")  # RGBA / L uploads
        image = self.video_processor.preprocess(image, height=h, width=w)
        image = image.to(self.device, torch.float32).unsqueeze(2)  # (1, 3, 1, H, W)
        if not self.expand_timesteps:
            # I2V-A14B: the image, then F-1 black frames, encoded as one video.
            rest = image.new_zeros(1, 3, settings.num_frames - 1, h, w)
            image = torch.cat([image, rest], dim=2)
        latents = self.vae.encode(image.to(self.vae.dtype)).latent_dist.mode().float()
        mean, std = vae_stats(self.vae, latents)
        latents = (latents - mean) * (1.0 / std)
        if not self.expand_timesteps:
            # The first frame stands for k (the temporal compression): 1 on all k mask
            # channels of latent frame 0, 0 elsewhere.
            mask = latents.new_zeros(1, self.scale_temporal, *latents.shape[2:])
            mask[:, :, 0] = 1
            latents = torch.cat([mask, latents], dim=1)
        cond["image"] = latents
        return cond

    # -- the batch -------------------------------------------------------------
    def latent_shape(self, request: Request) -> tuple[int, int, int, int]:
        """``(z, F_lat, h, w)``: diffusers' ``prepare_latents`` for one CPU generator."""
        frames = request.extra_key[0].num_frames
        f = (frames - 1) // self.scale_temporal + 1
        h, w = request.height // self.vae_scale_factor, request.width // self.vae_scale_factor
        return self.latent_channels, f, h, w

    def forward_inputs(self, requests: list[Request], conds: list[dict], latents) -> dict:
        """The video settings (for :meth:`schedule`), the image condition and TI2V's
        per-token timestep mask."""
        settings: VideoSettings = requests[0].extra_key[0]
        inputs: dict[str, Any] = {"video": settings}
        if settings.image:
            # TI2V: (B, z, 1, h, w) replaces latent frame 0; I2V-A14B: (B, 4 + z, F, h, w)
            # joins the noise's channels.
            key = "image_latents" if self.expand_timesteps else "condition"
            inputs[key] = torch.cat([c["image"] for c in conds])
        if self.expand_timesteps:
            # One timestep per token, 0 where the image's latents stand: (F * h/p * w/p,)
            _, f, h, w = latents.shape[1:]
            token_mask = torch.ones(f, h // self.patch, w // self.patch, device=self.device)
            if settings.image:
                token_mask[0] = 0
            inputs["token_mask"] = token_mask.flatten()
        return inputs

    def schedule(self, steps: int, latents: torch.Tensor, inputs: dict):
        """The checkpoint's UniPC scheduler with the batch's ``flow_shift``, and the expert
        of every step (``inputs["experts"]``: 0 while ``t >= boundary``), read from the
        timesteps once here, so the loop never compares a device tensor on the host."""
        shift = inputs["video"].flow_shift
        scheduler = flow_schedule(self.scheduler_config, steps, 0, self.device, self.spec.sigmas,
                                  self.spec.scheduler, flow_shift=shift)  # fmt: skip
        ratio = self.boundary_ratio if len(self.experts) == 2 else 0.0
        boundary = ratio * self.scheduler_config.get("num_train_timesteps", 1000)
        inputs["experts"] = [int(t < boundary) for t in scheduler.timesteps.tolist()]
        return scheduler

    # -- one step ----------------------------------------------------------------
    def step_guidance_scales(self, job: Job) -> list[float]:
        request = job.requests[0]
        scales = (request.true_cfg_scale, request.extra_key[0].guidance_scale_2)
        return [scales[e] for e in job.inputs["experts"]]

    def _with_image(self, job: Job, latents: torch.Tensor) -> torch.Tensor:
        """TI2V with an image: the image's latents in place of latent frame 0."""
        image = job.inputs.get("image_latents")
        if image is None:
            return latents
        return torch.cat([image.to(latents.dtype), latents[:, :, 1:]], dim=2)

    def forward(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        # Its own runtime's hooks run with each expert: self.runtime stays the first's.
        expert = self.placement.activate(job.inputs["experts"][job.step])
        hidden, b = self._with_image(job, job.latents), job.latents.shape[0]
        if "condition" in job.inputs:  # I2V-A14B: the condition's channels after the noise's
            hidden = torch.cat([hidden, job.inputs["condition"]], dim=1)
        mask = job.inputs.get("token_mask")  # TI2V: one timestep per token (B, S); else (B,)
        timestep = t.expand(b) if mask is None else (mask * t).expand(b, -1)
        dtype = expert.dtype
        return expert(
            hidden_states=hidden.to(dtype),
            timestep=timestep,
            encoder_hidden_states=job.inputs["text"][branch].to(dtype),
            return_dict=False,
        )[0]

    # -- decoding (returning rank only) ------------------------------------------
    def decode_chunks(self, job: Job, latents: torch.Tensor) -> tuple[list[torch.nn.Module], int]:
        """The VAE's ``_decode`` calls its ``decoder`` once per latent frame (F of them):
        a hook on ``vae.decoder`` fires once per frame."""
        return [self.vae.decoder], latents.shape[2]

    @torch.no_grad()
    def decode(self, job: Job, latents: torch.Tensor) -> list[np.ndarray]:
        """One ``(F, H, W, 3)`` uint8 video per request."""
        video = decode_3d(self.vae, self._with_image(job, latents.float()))
        frames = self.video_processor.postprocess_video(video, output_type="np")  # [0, 1]
        return list((frames * 255).round().astype(np.uint8))

    def preview(self, job: Job, x0: torch.Tensor) -> list[Image.Image]:
        """The first frame of each request's x0 estimate.

        The Wan VAE is causal in time, so latent frame 0 alone decodes to exactly the
        first video frame: a preview costs one frame's decode, not the whole video's.
        """
        return [Image.fromarray(video[0]) for video in self.decode(job, x0[:, :, :1])]

    def fill_result(self, result: GenerationResult, request: Request, output) -> None:
        settings: VideoSettings = request.extra_key[0]
        result.frames = output
        result.fps = request.params.fps or self.default_fps
        result.metadata.update(
            num_frames=settings.num_frames,
            fps=result.fps,
            guidance_scale=request.true_cfg_scale if request.do_cfg else None,
            guidance_scale_2=settings.guidance_scale_2 if request.do_cfg else None,
            flow_shift=settings.flow_shift,
        )


class WanImageToVideoPipeline(WanPipeline):
    """Image-to-video (I2V-A14B): the input image is the first frame.

    Also loads a TI2V-5B checkpoint (``expand_timesteps``) as diffusers'
    ``WanImageToVideoPipeline`` does; there the image is required as well.
    """

    spec = dataclasses.replace(SPEC, images=(1, 1), defaults=I2V_DEFAULTS)
