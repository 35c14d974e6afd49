"""The one generate harness: functions the model tests run in-process or send to every
rank of a worker pool, and the checks they share.

- images: ``generate`` runs our pipeline under a layout and returns each request's final
  latents; ``generate_fused`` runs a fused batch and returns the last loop's latents;
  ``diffusers_reference`` runs the diffusers pipeline of the same checkpoint on one
  request (memoised per session per checkpoint and request); ``check_layout`` /
  ``check_reference`` assert a layout against one rank and one rank against diffusers.
- video: ``generate_video`` and ``run_pipeline`` for Wan2.2 (frames, latents, experts).
- failure paths: ``fail_on_rank0``, ``cancel_after_first_step``, ``stepwise_join``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.runtime.stepping import generate_stepwise
from ithaca.testing.distributed import parallel_state
from ithaca.testing.tiny_wan import build_tiny_wan
from ithaca.types import GenerationParams


# -- images ---------------------------------------------------------------------------------
def _run_batch(pipe, batch: list[dict]):
    """``(results, images as uint8 arrays, info)`` of ``batch`` on ``pipe``; ``info`` says
    what the last forward sharded and gathered and whether this rank has the text encoder."""
    results = pipe.generate([GenerationParams(**b) for b in batch])
    images = [[np.asarray(im) for im in r.images] for r in results]
    info = {
        "sharded": list(pipe.runtime.sharded),
        "gathered": list(pipe.runtime.gathered),
        "has_text_encoder": pipe.text_encoder is not None,
    }
    return results, images, info


def generate(layout: dict, path: str, batch: list[dict], attrs: dict | None = None,
             loras: tuple = ()):  # fmt: skip
    """Run ``batch`` under ``layout``: ``(images, latents, info)`` in batch order.

    ``latents`` holds each request's final latents ``(num_images, ...)`` fp32 (requests
    need distinct ``request_id`` s). Images and latents come back only from the
    returning rank (elsewhere: empty lists). ``info`` lists what the last forward
    sharded and gathered, whether this rank loaded the text encoder and each request's
    metadata (on every rank; a cached request's ``["cache"]["pattern"]`` is this rank's
    ``(step, branch, cached)`` list). ``attrs`` are set on the loaded pipeline (e.g. a
    small ``target_area`` for edit pipelines); ``loras`` are ``(name, path, scale)``
    adapters loaded first.
    """
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        for name, value in (attrs or {}).items():
            setattr(pipe, name, value)
        for name, lora_path, scale in loras:  # (name, path, scale): every rank loads them
            pipe.load_lora(name, lora_path, scale)
        captured: dict[str, torch.Tensor] = {}
        decode = pipe.decode

        def record(job, latents):
            start = 0
            for r in job.requests:  # the job's rows: each request's images in turn
                n = r.params.num_images
                captured[r.params.request_id] = latents[start : start + n].float().cpu()
                start += n
            return decode(job, latents)

        pipe.decode = record
        stats = pipe.cache_stats  # every rank: a cached request's (step, branch, cached) list
        pipe.cache_stats = lambda c, cfg, of=None: dict(
            stats(c, cfg, of), pattern=list((c.stats if of is None else of).pattern)
        )
        results, images, info = _run_batch(pipe, batch)
        info |= {
            "metadata": [r.metadata for r in results],
            # padded length -> valid length, for every sequence the last forward padded
            "valid_lengths": {
                n: pipe.runtime.valid_length(n)
                for n in range(1, 4097)
                if pipe.runtime.valid_length(n) is not None
            },
        }
        pipe.runtime.remove()
        latents = [captured[b["request_id"]] for b in batch] if captured else []
        return images, latents, info


def _flux_kwargs(r: dict) -> dict:
    kw = dict(guidance_scale=r.get("guidance_scale", 3.5))
    if r.get("negative_prompt") is not None:
        kw.update(negative_prompt=r["negative_prompt"], true_cfg_scale=r.get("true_cfg_scale", 1.0))
    return kw


def _cfg_kwargs(r: dict) -> dict:
    """Families whose diffusers pipeline calls the CFG scale ``guidance_scale``."""
    kw = dict(guidance_scale=r.get("true_cfg_scale", 0.0))
    if r.get("negative_prompt") is not None:
        kw["negative_prompt"] = r["negative_prompt"]
    return kw


FAMILY_KWARGS = {
    "FluxPipeline": _flux_kwargs,
    "ZImagePipeline": _cfg_kwargs,
    "StableDiffusion3Pipeline": _cfg_kwargs,
    "LongCatImagePipeline": lambda r: dict(_cfg_kwargs(r), enable_prompt_rewrite=False),
    "OvisImagePipeline": _cfg_kwargs,
    "LongCatImageEditPipeline": lambda r: dict(_cfg_kwargs(r), image=r["images"][0]),
}


class _VisionOnlyProcessor:
    """Stands in for a Qwen2VLProcessor where only its ``image_processor`` is read."""

    def __init__(self, image_processor):
        self.image_processor = image_processor


def _load_reference(class_name: str, path: str):
    """The diffusers pipeline of ``path``, around what cannot load here."""
    from diffusers import DiffusionPipeline

    if class_name == "LongCatImagePipeline":
        # text_processor is only used by prompt rewriting, which we skip.
        return DiffusionPipeline.from_pretrained(path, text_processor=None)
    if class_name == "LongCatImageEditPipeline":
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            LongCatImageEditPipeline,
            LongCatImageTransformer2DModel,
        )
        from transformers import (
            AutoTokenizer,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLImageProcessor,
        )

        # Qwen2VLProcessor needs torchvision for its video part, and from_pretrained
        # type-checks components; the pipeline only reads text_processor.image_processor.
        vision = Qwen2VLImageProcessor.from_pretrained(path, subfolder="text_processor")
        return LongCatImageEditPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path, subfolder="text_encoder"
            ),
            tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_processor=_VisionOnlyProcessor(vision),
            transformer=LongCatImageTransformer2DModel.from_pretrained(
                path, subfolder="transformer"
            ),
        )
    return DiffusionPipeline.from_pretrained(path)


_LOAD_REFERENCE = _load_reference


_REFERENCES: dict[tuple, tuple] = {}
"""Session memo of :func:`diffusers_reference`: (checkpoint, request, area) -> result."""


def diffusers_reference(path: str, request: dict, target_area: int | None = None):
    """The diffusers pipeline on one request: ``(final latents fp32, images uint8)``.

    ``target_area`` replaces the 1024*1024 px output area of LongCat-Image-Edit. Computed
    once per session for each (checkpoint, JSON request, area) while ``_load_reference`` is
    this module's own (a test that patches it, e.g. to load adapters, always runs
    diffusers); every caller gets its own copy.
    """
    try:  # requests of plain values only (an image in a request is not a key)
        key = (os.path.realpath(path), json.dumps(request, sort_keys=True), target_area)
    except TypeError:
        key = None
    if key is None or _load_reference is not _LOAD_REFERENCE:
        return _diffusers_reference(path, request, target_area)
    if key not in _REFERENCES:
        _REFERENCES[key] = _diffusers_reference(path, request, target_area)
    latents, images = _REFERENCES[key]
    return latents.clone(), [im.copy() for im in images]


@torch.no_grad()
def _diffusers_reference(path: str, request: dict, target_area: int | None):
    import contextlib
    import inspect
    from unittest import mock

    with open(os.path.join(path, "model_index.json")) as f:
        class_name = json.load(f)["_class_name"]
    pipe = _load_reference(class_name, path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=request["prompt"],
        num_inference_steps=request["num_inference_steps"],
        num_images_per_prompt=request.get("num_images", 1),
        **FAMILY_KWARGS[class_name](request),
    )
    if "image" not in kwargs:
        kwargs.update(width=request["width"], height=request["height"])
    patch = contextlib.nullcontext()
    if target_area is not None:
        from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as module

        original = module.calculate_dimensions
        patch = mock.patch.object(
            module, "calculate_dimensions", lambda area, ratio: original(target_area, ratio)
        )

    def run(**extra):
        generator = torch.Generator("cpu").manual_seed(request["seed"])
        with patch:
            return pipe(generator=generator, **kwargs, **extra).images

    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        captured = {}

        def on_step(pipeline, i, t, tensors):
            captured["latents"] = tensors["latents"].float().clone()
            return {}

        images = run(
            callback_on_step_end=on_step,
            callback_on_step_end_tensor_inputs=["latents"],
            output_type="pil",
        )
        latents = captured["latents"]
    else:  # no step callback: the same seeded run twice, once stopping at the latents
        latents = run(output_type="latent").float()
        images = run(output_type="pil")
    return latents, [np.asarray(im) for im in images]


def max_image_diff(a: list, b: list) -> int:
    """Largest uint8 difference between two lists of images of equal shapes."""
    assert len(a) == len(b), (len(a), len(b))
    worst = 0
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape, (x.shape, y.shape)
        worst = max(worst, int(np.abs(x.astype(int) - y.astype(int)).max()))
    return worst


def record(family: str, layout: str, latent_err: float, image_diff: int, cache: str = "none"):
    """Append one passed parity check to ``$ITHACA_SUPPORT_RECORD`` (JSON lines), if set.

    ``python -m tools.support_matrix`` sets it, runs these tests and renders
    the support matrix of ``docs/models.md`` from them: it lists what passed, nothing else.
    """
    print(f"{family} {layout}: max latent error {latent_err:.2e}, max image diff {image_diff}/255")
    target = os.environ.get("ITHACA_SUPPORT_RECORD")
    if not target:
        return
    entry = dict(family=family, layout=layout, cache=cache, latent_err=latent_err,
                 image_diff=image_diff)  # fmt: skip
    with open(target, "a") as f:
        f.write(json.dumps(entry) + "\n")


LAYOUT_LATENT_TOL = 1e-4
"""Final latents of a layout vs our 1-rank run (fp32; attention's sum order changes)."""

EDIT_AREA = dict(default_width=128, default_height=128)
"""``attrs`` of a Qwen-Image edit run compared with our own 1-rank run (not diffusers):
the input images are resized to a 128x128 px area instead of 1024x1024 (the output keeps
the request's size). Their VAE encode and their tokens were most of such a run's time;
the layout and cache code paths are the same at either area."""

LAYOUTS = {
    "ulysses2": dict(ulysses_degree=2),
    "ring2": dict(ring_degree=2),
    "cfg2": dict(cfg_parallel_size=2),
    "hybrid2x2": dict(ulysses_degree=2, ring_degree=2),
}
"""The layouts every family is checked under (families add their own on top)."""

CFG_REQUEST = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0, width=28,
                   height=20, num_inference_steps=2, seed=3, num_images=2,
                   request_id="cfg")  # fmt: skip
NO_CFG_REQUEST = dict(prompt="a small blue bird near a tree", true_cfg_scale=1.0, width=28,
                      height=20, num_inference_steps=2, seed=4, request_id="no_cfg")  # fmt: skip
"""A CFG request (two images) and one with CFG off, 28x20 px: 7x5 = 35 packed tokens,
divisible by none of the sequence-parallel sizes (``auto_pad``)."""

FLUX_STYLE_HOOKS = dict(sharded=[".hidden_states", ".img_ids"], gathered=["proj_out[0]"],
                        valid={36: 35})  # fmt: skip
"""What FLUX.1's plan does to a 35-token image on every rank (padded to 36)."""


def check_family_layout(worker_pool, family: str, name: str, layout: dict, checkpoint: str,
                        batch: list[dict], one_rank: tuple, hooks: dict, attrs=None):  # fmt: skip
    """Run ``batch`` under ``layout`` on a worker pool, check it against ``one_rank``
    (with ``hooks``, what the plan did on every rank, when the layout shards the
    sequence) and record the cell ``family`` x ``name``."""
    results = worker_pool(world_size(layout)).run(generate, layout, checkpoint, batch, attrs)
    sharded = "ulysses_degree" in layout or "ring_degree" in layout
    err, diff = check_layout(results, one_rank, **(hooks if sharded else {}))
    record(family, name, err, diff)


def check_family_reference(family: str, checkpoint: str, request: dict, one_rank: tuple,
                           index: int, **reference_args):  # fmt: skip
    """Check request ``index`` of ``one_rank`` (which ran ``request`` there) against the
    diffusers reference of ``checkpoint`` and record the cell ``family`` x 1 rank."""
    reference = diffusers_reference(checkpoint, request, **reference_args)
    err, diff = check_reference(one_rank, index, reference)
    record(family, "1 rank vs diffusers", err, diff)


def world_size(layout: dict) -> int:
    size = 1
    for degree in layout.values():
        size *= degree
    return size


def check_layout(results: list, one_rank: tuple, sharded=None, gathered=None, valid=None):
    """Assert a layout's per-rank ``generate`` results equal the 1-rank run.

    Latents within :data:`LAYOUT_LATENT_TOL`, images within 1/255, outputs and text
    encoders only on the returning rank; with ``sharded`` / ``gathered`` / ``valid``
    also what the plan's hooks did on every rank (not a silent unsharded run).
    Returns ``(max latent error, max image diff)``.
    """
    ref_images, ref_latents, _ = one_rank
    images, latents, info = results[0]
    err = max((a - b).abs().max().item() for a, b in zip(latents, ref_latents, strict=True))
    assert err <= LAYOUT_LATENT_TOL, f"final latents differ from 1 rank by {err:.2e}"
    diff = max(max_image_diff(a, b) for a, b in zip(images, ref_images, strict=True))
    assert diff <= 1, f"images differ from 1 rank by {diff}/255"
    assert info["has_text_encoder"]
    for other_images, other_latents, other in results[1:]:
        assert not other_latents and all(not im for im in other_images)
        assert not other["has_text_encoder"]
    for _, _, rank_info in results:
        if sharded is not None:
            assert rank_info["sharded"] == sharded, rank_info["sharded"]
        if gathered is not None:
            assert rank_info["gathered"] == gathered, rank_info["gathered"]
        if valid is not None:
            assert rank_info["valid_lengths"] == valid, rank_info["valid_lengths"]
    return err, diff


def check_reference(one_rank: tuple, index: int, reference: tuple, tol: float = 1e-5):
    """Assert request ``index`` of a 1-rank run equals diffusers' ``reference``: latents
    within ``tol``, images within 1/255 (not bit-identical by construction: our attention
    runs another kernel than diffusers', and a batch may be fused differently)."""
    images, latents, _ = one_rank
    ref_latents, ref_images = reference
    err = (latents[index] - ref_latents).abs().max().item()
    assert err <= tol, f"final latents differ from diffusers by {err:.2e}"
    diff = max_image_diff(images[index], ref_images)
    assert diff <= 1, f"images differ from diffusers by {diff}/255"
    return err, diff


# -- fused batches, failures, step-level joins ---------------------------------------------


def generate_fused(layout: dict, path: str, batch: list[dict], attrs: dict | None = None):
    """Run ``batch`` under ``layout`` with fused batches; return (images as uint8 arrays,
    the last loop's final latents, info) with images and latents only on the returning
    rank; ``info`` says what the last forward sharded and gathered and which encoders this
    rank loaded. ``attrs`` are set on the loaded pipeline (as in :func:`generate`)."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        for name, value in (attrs or {}).items():
            setattr(pipe, name, value)
        # Fused: the two requests of a batch share forwards, so prompts of different
        # lengths go through the shards padded, with a key mask.
        pipe.fuse_batches = True
        captured = []
        decode = pipe.decode

        def record(job, latents):
            captured.append(latents.float().cpu())
            return decode(job, latents)

        pipe.decode = record
        _, images, info = _run_batch(pipe, batch)
        info["has_vae"] = pipe.vae is not None
        pipe.runtime.remove()
        return images, (captured[-1] if captured else None), info


def fail_on_rank0(layout: dict, path: str) -> str:
    """Conditioning raises on the returning rank; every rank must raise, none may hang."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)

        def broken(request):
            raise ValueError("tokenizer exploded")

        pipe.condition = broken
        try:
            pipe.generate(
                [GenerationParams(prompt="x", width=64, height=64, num_inference_steps=2)]
            )
        except (RuntimeError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            pipe.runtime.remove()
        return "no error"


def cancel_after_first_step(layout: dict, path: str):
    """The returning rank's callback cancels after step 1; every rank must stop there."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        calls = []

        def callback(event):
            calls.append(event.step)
            return True

        params = GenerationParams(prompt="x", width=64, height=64, num_inference_steps=3, seed=1)
        result = pipe.generate([params], callback)[0]
        pipe.runtime.remove()
        return calls, result.metadata.get("cancelled"), result.metadata.get("steps_done")


def stepwise_join(layout: dict, path: str, batch: list[dict], joiner: dict):
    """Step-level batching under ``layout``: ``joiner`` joins after step 1, handed over by
    the returning rank's ``admit`` only. Returns (images by request id on the returning
    rank, every request's ``joined_at_batch_step`` as this rank saw it, boundaries seen)."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        boundaries = []

        def admit(accepts):
            boundaries.append(len(boundaries) + 1)
            return [GenerationParams(**joiner)] if len(boundaries) == 1 else []

        results = generate_stepwise(
            pipe,
            [GenerationParams(**b) for b in batch],
            admit=admit if pipe.is_returning_rank else None,
        )
        pipe.runtime.remove()
        images = {r.request_id: [np.asarray(im) for im in r.images] for r in results}
        joined = {r.request_id: r.metadata["batching"]["joined_at_batch_step"] for r in results}
        return images, joined, boundaries


# -- video (Wan2.2) -------------------------------------------------------------------------

KINDS = ("t2v_a14b", "i2v_a14b", "ti2v_5b")
FAMILIES = {"t2v_a14b": "Wan2.2-T2V-A14B", "i2v_a14b": "Wan2.2-I2V-A14B",
            "ti2v_5b": "Wan2.2-TI2V-5B"}  # fmt: skip
"""Support-matrix names of the tiny checkpoint kinds."""


def tiny_wan_paths(root: Path) -> dict[str, str]:
    """Tiny Wan checkpoints under ``root`` (built on first use, seed 0)."""
    paths = {}
    for kind in KINDS:
        path = root / kind
        if not (path / "model_index.json").is_file():
            build_tiny_wan(path, kind)
        paths[kind] = str(path)
    return paths


def run_pipeline(pipe, batch: list[dict]):
    """``(frames per request, final latents of the loop, experts per forward, results)``."""
    captured, experts = [], []
    decode, activate = pipe.decode, pipe.placement.activate

    def record_decode(job, latents):
        captured.append(latents.float().cpu())
        return decode(job, latents)

    def record_activate(index):
        experts.append(index)
        return activate(index)

    pipe.decode, pipe.placement.activate = record_decode, record_activate
    try:
        results = pipe.generate([GenerationParams(**b) for b in batch])
    finally:
        del pipe.decode, pipe.placement.activate  # back to the class / instance methods
    frames = [r.frames for r in results]
    return frames, (captured[-1] if captured else None), experts, results


def generate_video(layout: dict, path: str, batch: list[dict]):
    """Run the Wan ``batch`` under ``layout`` on this rank: (frames, latents, info)."""
    torch.manual_seed(0)
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        frames, latents, experts, _ = run_pipeline(pipe, batch)
        info = {
            "sharded": [list(r.sharded) for r in pipe.runtimes],
            "gathered": [list(r.gathered) for r in pipe.runtimes],
            "experts": experts,
            "has_text_encoder": pipe.text_encoder is not None,
            "has_vae": pipe.vae is not None,
        }
        for runtime in pipe.runtimes:
            runtime.remove()
        return frames, latents, info


def max_frame_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def generate_cached(layout: dict, path: str, request: dict, backend=None, options=None):
    """``request`` on every rank of ``layout`` under the step cache ``backend`` with
    ``options``: (result, the cache's computed/skipped pattern, rank 0's final latents
    fp32 or None elsewhere)."""
    latents: list = []
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state, cache_backend=backend, cache_config=options)
        decode = pipe.decode
        pipe.decode = lambda job, x: (latents.append(x.float().cpu()), decode(job, x))[1]
        result = pipe.generate([GenerationParams(**request)])[0]
        pattern = pipe.step_cache.stats.pattern if pipe.step_cache is not None else []
        for runtime in getattr(pipe, "runtimes", [pipe.runtime]):  # Wan: one per expert
            runtime.remove()
    return result, pattern, latents[0] if latents else None


def check_cache_layout(worker_pool, run, path: str, layout: dict, backend, options):
    """``run(layout, path, backend, options)`` -> ``(pixels, metadata, pattern, latents)``
    on 2 ranks against 1 rank: pixels within 1/255, the same cache report, final latents
    within 1e-4, and every rank skips the steps one rank skips (a CFG rank: those of its
    branch). Returns (latent error, pixel difference) to record."""
    ref_pixels, ref_meta, ref_pattern, ref_latents = run({}, path, backend, options)
    results = worker_pool(2).run(run, layout, path, backend, options)
    pixels, meta, _, latents = results[0]
    diff = int(np.abs(pixels.astype(int) - ref_pixels.astype(int)).max())
    assert diff <= 1, f"output differs by {diff}/255"
    assert meta["cache"] == ref_meta["cache"]
    err = (latents - ref_latents).abs().max().item()
    assert err <= 1e-4, f"final latents differ by {err:.2e}"
    for rank, (_, _, pattern, _) in enumerate(results):
        if layout.get("cfg_parallel_size", 1) == 2:  # cfg rank r runs branch r only
            assert pattern == [p for p in ref_pattern if p[1] == rank]
        else:
            assert pattern == ref_pattern, f"rank {rank} skipped other steps"
    return err, diff
