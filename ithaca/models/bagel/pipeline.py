"""Bagel on the shared loop (``base.py``): resolve / condition / prepare / predict / decode.

Requests: text-to-image, or an edit with one input image. Bagel's sampling settings
arrive as extension fields (``GenerationParams.model_options``; official defaults in
:class:`~ithaca.models.bagel.sampling.SamplingParams`). ``true_cfg_scale`` or
``guidance_scale`` stand for ``cfg_text_scale`` when it is not given;
``num_inference_steps`` n means ``num_timesteps`` n + 1 (n model steps). An edit's output
has the size of its transformed input (``size`` is not used). A request's ``seed`` draws
the noise as the official inferencer does for that seed; image k of ``n`` uses seed + k.

Streaming previews (``partial_images``) decode the x0 estimate ``x_t - t * v``.
Not supported: negative prompts (Bagel's guidance contexts come from the prompt and the
input image), more than one input image, sequence or CFG parallelism (every branch
attends to its own KV cache: a layout that asks for either is refused at load, unless
with ``use_hsdp`` or tensor parallelism).

Tensor parallel (``Bagel._tp_plan``) and HSDP (``use_hsdp``, ``Bagel._hsdp_units``) split
the weights over ranks that each run the whole request (prefill, every branch, every
step); a replica's sequence / CFG axes compute redundantly (docs/parallel.md, "Bagel").
Step caches wrap the decoder layers during generation only (not the prefill), with one
state per image and CFG branch; the TeaCache indicator is the first layer's gen-expert
input norm.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch
from PIL import Image
from transformers import Qwen2Tokenizer

from ithaca.cache import BlockCacheAdapter, Rows, checkpoint_coefficients
from ithaca.models.bagel import inputs, loader, sampling
from ithaca.models.base import DenoisingPipeline, seeded_noise, split_images
from ithaca.parallel import ParallelState
from ithaca.parallel.tensor import apply_tensor_parallel
from ithaca.runtime.loading import component_dir
from ithaca.runtime.loop import Job, Request
from ithaca.runtime.progress import up_block_chunks
from ithaca.types import GenerationParams, ParamError

logger = logging.getLogger(__name__)
_OPTIONS = {f.name for f in dataclasses.fields(sampling.SamplingParams)}
TINY_FIXTURE_COEFFICIENTS = (
    -3251.234782124325,
    684.2727096654733,
    -47.96828517042242,
    2.722866184521024,
    -0.008989506075890094,
)
"""TeaCache polynomial fitted HERE, on the tiny random-weight golden checkpoint (CPU, fp32):
``ithaca calibrate-teacache ../shared/bagel-golden/checkpoint --width 128 --height 128
--num-inference-steps 20`` (210 samples). No fit of the real BAGEL-7B-MoT exists: run the
same command on it (``--write`` stores it in the checkpoint's ``ithaca.json``, which wins)."""


def gen_input_norm(layer: torch.nn.Module, args: dict) -> torch.Tensor:
    """TeaCache's indicator: the first layer's gen-expert input norm of the latent rows."""
    return layer.input_layernorm_moe_gen(args["hidden_states"][:, args["segment"].gen])


class BagelPipeline(DenoisingPipeline):
    default_steps = sampling.SamplingParams.num_timesteps - 1
    default_true_cfg_scale = sampling.SamplingParams.cfg_text_scale
    joins_mid_run = False  # no step batches: each request attends to its own KV caches
    compile_refusal = (  # measured: docs/performance.md, "--compile and Bagel"
        "Bagel: its decoder layers recompile per layer and per segment shape (prefill, "
        "KV length), 8 graphs (dynamo's recompile limit) for one 2-step request of the "
        "3-layer tiny checkpoint, so most layers would run eager; serve it without --compile"
    )

    def __init__(self, model: str, state: ParallelState, dtype: torch.dtype):
        redundant = state.sp.size > 1 or state.cfg.size > 1
        if redundant and not (state.config.use_hsdp or state.tp.size > 1):
            raise ValueError(
                f"Bagel supports no sequence or CFG parallelism (sequence-parallel size "
                f"{state.sp.size}, cfg_parallel_size {state.cfg.size}): the ranks of a replica "
                "would each run the whole request: only --use-hsdp (the weights split over "
                "them) makes that worthwhile, and beside --tensor-parallel-size each tp group "
                "runs it (no faster, a warning); use data parallelism"
            )
        super().__init__(state, dtype)
        if redundant and state.tp.size > 1 and state.replica.rank == 0:
            logger.warning(
                "Bagel at tensor_parallel_size %d with sequence-parallel size %d, "
                "cfg_parallel_size %d: every tp group runs the whole request (Bagel has no "
                "sequence or CFG parallelism), so those axes add no speed; data parallelism "
                "would serve more requests with the same ranks",
                state.tp.size, state.sp.size, state.cfg.size,
            )  # fmt: skip
        self.model_dir = model = component_dir(model, None)  # a hub id: fetched, as any family
        over = loader.overrides(model)
        net = loader.build(model)  # on meta; HSDP / TP: each rank reads only its part
        shard = self.weight_shard(type(net))
        self.net = loader.load_weights(net, model, dtype, self.device, shard=shard)
        self.transformer = self.net.llm  # what the step caches wrap (its ``layers``)
        self.runtime = None  # no sequence-parallel runtime (the step caches' padding)
        # TP: the split layers' hooks, local head counts (marks the pipeline as split)
        self.transformer._ithaca_tp = apply_tensor_parallel(self.net, state, "Bagel")
        self.vae = loader.load_vae(model, over, self.device)  # fp32
        self.limits = loader.image_limits(over)
        self.tokenizer = Qwen2Tokenizer.from_pretrained(model)  # the slow one, as official
        ids = self.tokenizer.convert_tokens_to_ids
        self.bos, self.eos = ids("<|im_start|>"), ids("<|im_end|>")
        self.markers = (ids("<|vision_start|>"), ids("<|vision_end|>"))
        self.max_side = self.net.cfg.max_latent_size * self.multiple

    # -- request validation ----------------------------------------------------
    def resolve(self, params: GenerationParams) -> Request:
        steps = self.checked_steps(params)
        if params.negative_prompt is not None:
            raise ParamError(
                "negative_prompt", "Bagel takes no negative_prompt (its CFG contexts are built in)"
            )
        if len(params.images) > 1:
            raise ParamError("image", f"Bagel edits one input image, got {len(params.images)}")
        options = dict(params.model_options or {})
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ParamError(
                unknown[0], f"unknown Bagel option(s) {unknown}; known: {sorted(_OPTIONS)}"
            )
        generic = [s for s in (params.true_cfg_scale, params.guidance_scale) if s is not None]
        if generic:  # the generic CFG fields stand for Bagel's text scale
            options.setdefault("cfg_text_scale", float(generic[0]))
        options.setdefault("num_timesteps", steps + 1)
        try:
            spec = sampling.SamplingParams(**options)
        except ValueError as exc:  # its messages start with the field's name
            raise ParamError(str(exc).split(" ", 1)[0], str(exc)) from None
        if params.images:
            w, h = inputs.fitted_size(*params.images[0].size, self.limits[0])
        else:
            w, h = self.rounded_size(params.width, params.height)
        if max(w, h) > self.max_side:
            raise ParamError("size", f"size ({w}x{h}) must have both sides <= {self.max_side}")
        steps, scale, lora = spec.num_timesteps - 1, spec.cfg_text_scale, self.resolve_lora(params)
        # do_cfg False: the loop's two-branch CFG is off, ``predict`` runs Bagel's branches
        return Request(params, w, h, steps, scale, False, params.seed, (spec,), lora)

    def guides(self, request: Request) -> bool:
        """Bagel's own branches (``do_cfg`` stays False: the loop's two-branch CFG is off)."""
        return request.extra_key[0].cfg_text_scale > 1.0

    # -- conditioning: token ids and the input image, then the three KV caches -------
    @torch.no_grad()
    def condition(self, request: Request) -> dict[str, Any]:
        """On the replica's rank 0 (then broadcast): the prompt block's ids and the input
        image through the VAE and the ViT's patching (plain tensors); the decoder is not
        run here (see :meth:`prepare`)."""
        p = request.params
        ids = [self.bos, *self.tokenizer.encode(p.prompt), self.eos]
        block = torch.tensor(ids, device=self.device)
        image = None
        if p.images:
            image = inputs.encode_image(self.net, self.vae, p.images[0], *self.limits, self.device)
        return {"prompt_block": block, "image": image}

    @torch.no_grad()
    def prepare(self, requests: list[Request], conds: list[dict[str, Any]]) -> Job:
        """Each request's KV caches, prefilled on every rank of the replica (under HSDP the
        sharded decoder's all-gathers need every rank), a noise row per image (image k:
        seed + k), the group's scheduler and, decided before the loop (no host read in
        it), which steps run the guidance branches (size and settings are the group's)."""
        spec, first = requests[0].extra_key[0], requests[0]
        grid = (first.height // self.multiple, first.width // self.multiple)
        schedule = sampling.scheduler(spec, self.device)
        guided = [sampling.guided(t, spec) for t in schedule.timesteps.tolist()]
        pos = sampling.latent_positions(*grid, self.net.cfg.max_latent_size, self.device)
        shape = (grid[0] * grid[1], self.net.llm2vae.out_features)
        queries, noise = [], []  # per image row
        for r, c in zip(requests, conds, strict=True):
            contexts = sampling.build_contexts(
                self.net, c["prompt_block"], self.markers, c["image"]
            )
            n = r.params.num_images
            queries += [sampling.Query(contexts, pos, spec, guided, self.markers)] * n
            image_seeds = range(c["seed"], c["seed"] + n)
            noise += [seeded_noise(shape, s, torch.float32, self.device) for s in image_seeds]
        seeds, inputs = [c["seed"] for c in conds], {"queries": queries, "grid": grid}
        return Job(requests, seeds, torch.stack(noise), schedule.timesteps, schedule, inputs)

    @torch.no_grad()
    def predict(self, job: Job, branch: int, t: torch.Tensor) -> torch.Tensor:
        """Every image's guided velocity at step ``job.step``: Bagel's up to three branches
        run here (the loop's two-branch CFG is off, ``do_cfg`` False), one image at a time,
        each image and branch under its own step-cache state."""
        i, cache, out = job.step, self.step_cache, []
        for k, (query, x) in enumerate(zip(job.inputs["queries"], job.latents, strict=True)):
            rows = [Rows(k, -1, i, len(job.timesteps))]  # image k: its own state per branch
            scope = None if cache is None else functools.partial(cache.step, i, rows=rows)
            out.append(query.velocity(self.net, x, t, i, scope)[0])
        return torch.stack(out)

    @torch.no_grad()
    def decode(self, job: Job, latents: torch.Tensor) -> list[list[Image.Image]]:
        """Each image on its own (bit for bit what it decodes alone)."""
        grid = job.inputs["grid"]
        u8 = [inputs.decode_tokens(self.vae, x, grid)[2] for x in latents]
        return split_images([Image.fromarray(u.cpu().numpy()) for u in u8], job.requests)

    def decode_chunks(self, job: Job, latents: torch.Tensor):
        blocks, n = up_block_chunks(self.vae)
        return blocks, n * len(latents)  # one VAE call per image

    def fill_result(self, result, request: Request, output) -> None:
        result.images = output
        result.metadata["bagel"] = dataclasses.asdict(request.extra_key[0])

    # -- step caches --------------------------------------------------------------
    def cache_adapter(self) -> BlockCacheAdapter:
        fitted = checkpoint_coefficients(self.model_dir, TINY_FIXTURE_COEFFICIENTS)
        return BlockCacheAdapter(
            "layers", returns="hidden", modulated_input=gen_input_norm, teacache_coefficients=fitted
        )
