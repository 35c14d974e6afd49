"""Qwen-Image-Layered: 1 rank equals diffusers' QwenImageLayeredPipeline; every layout
equals 1 rank.

Pyramid: request validation, registry and previews in-process; 1-rank runs against the
diffusers reference on the tiny layered checkpoint (fp32 latents within 1e-5, identical
uint8 RGBA layers), with a prompt and true CFG (two images of three layers) and with an
empty prompt that the text encoder captions; then 2- and 4-rank gloo runs of the whole
pipeline against our 1-rank run: final latents within 1e-4, layers within 1/255.

The output is 96x96 px (3x3 packed latent tokens per frame): 3 layers + the composite
frame + the input image's tokens are 5 x 9 = 45 tokens, which divides by neither 2 nor
4, so every sharded run pads (``auto_pad``) the one sequence that holds every layer and
the condition image.
"""

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from ithaca.models.qwen_image import layered
from ithaca.models.registry import load_pipeline, pipeline_class
from ithaca.parallel import ParallelState
from ithaca.testing.tiny import build_tiny_qwen_image
from ithaca.types import GenerationParams
from tests.models.harness import (
    LAYOUTS,
    check_family_layout,
    check_reference,
    generate,
    record,
    world_size,
)
from tests.models.test_qwen_image import reference_pipeline


def _rgba(width=56, height=40, seed=3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 4), dtype=np.uint8), "RGBA")


CFG = dict(prompt="a red cat", negative_prompt=" ", true_cfg_scale=4.0, width=96, height=96,
           num_inference_steps=2, seed=7, layers=3, images=[_rgba()], request_id="cfg")  # fmt: skip
# An empty prompt: the text encoder captions the input image (8 new tokens here).
CAPTIONED = dict(prompt=" ", width=96, height=96, num_inference_steps=2, seed=8, layers=2,
                 images=[_rgba(seed=4).convert("RGB")], request_id="captioned")  # fmt: skip
CAPTION_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint(build_tiny_qwen_image, "layered")


@pytest.fixture(scope="module")
def one_rank(checkpoint):
    return generate({}, checkpoint, [CFG])


@torch.no_grad()
def layered_reference(path: str, request: dict):
    """diffusers' (final latents fp32, uint8 layers flattened image-major) for ``request``."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as module

    pipe = reference_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    size = (request["width"], request["height"])
    generate_text = pipe.text_encoder.generate
    captured = {}

    def keep(_pipe, _i, _t, tensors):
        captured["latents"] = tensors["latents"].float().clone()
        return tensors

    with (
        # Our explicit width/height stand for the reference's 640 bucket.
        mock.patch.object(module, "calculate_dimensions", lambda area, ratio: size),
        mock.patch.object(  # fewer caption tokens than the reference's 512
            pipe.text_encoder, "generate",
            lambda **kw: generate_text(**{**kw, "max_new_tokens": CAPTION_TOKENS}),
        ),
    ):  # fmt: skip
        images = pipe(
            image=request["images"][0].convert("RGBA"),
            prompt=request["prompt"],
            negative_prompt=request.get("negative_prompt"),
            true_cfg_scale=request.get("true_cfg_scale", 4.0),
            layers=request["layers"],
            num_inference_steps=request["num_inference_steps"],
            num_images_per_prompt=request.get("num_images", 1),
            generator=torch.Generator().manual_seed(request["seed"]),
            callback_on_step_end=keep,
            cfg_normalize=True,
            use_en_prompt=True,
        ).images
    # The reference groups layers per prompt; flattened, they are image-major like ours.
    return captured["latents"], [np.asarray(im) for group in images for im in group]


@pytest.mark.parametrize(
    "request_", [dict(CFG, num_images=2), CAPTIONED], ids=["cfg_two_images", "captioned"]
)
def test_one_rank_matches_diffusers(checkpoint, request_, monkeypatch):
    monkeypatch.setattr(layered, "CAPTION_MAX_NEW_TOKENS", CAPTION_TOKENS)
    ours = generate({}, checkpoint, [request_])
    images = ours[0][0]
    n = request_.get("num_images", 1) * request_["layers"]
    assert len(images) == n and all(im.shape == (96, 96, 4) for im in images)
    assert images[0][..., 3].std() > 10  # the alpha channel carries a picture, not a constant
    err, diff = check_reference(ours, 0, layered_reference(checkpoint, request_))
    record("Qwen-Image-Layered", "1 rank vs diffusers", err, diff)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_rank(worker_pool, checkpoint, one_rank, name):
    layout = LAYOUTS[name]
    # What the plan's hooks do on every rank of a sharded layout: 45 tokens padded.
    padded = 46 if world_size(layout) == 2 else 48
    hooks = dict(sharded=["pos_embed[0]", "transformer_blocks.0.hidden_states"],
                 gathered=["proj_out[0]"], valid={padded: 45})  # fmt: skip
    check_family_layout(worker_pool, "Qwen-Image-Layered", name, layout, checkpoint, [CFG],
                        one_rank, hooks)  # fmt: skip


def test_requests_resolve_like_the_reference(checkpoint):
    pipe = load_pipeline(checkpoint, ParallelState.single())
    assert pipeline_class(checkpoint) is layered.QwenImageLayeredPipeline
    # Default: the 640 bucket with the input's aspect ratio (56:40), multiples of 32.
    r = pipe.resolve(GenerationParams(prompt="x", images=[_rgba()]))
    assert (r.width, r.height, pipe.layers_of(r)) == (768, 544, 4)
    r = pipe.resolve(GenerationParams(prompt="", images=[_rgba()], layers=2, width=100, height=70))
    assert (r.width, r.height, pipe.layers_of(r)) == (96, 64, 2)
    with pytest.raises(ValueError, match="needs exactly one input image, got 0"):
        pipe.resolve(GenerationParams(prompt="x"))
    with pytest.raises(ValueError, match=r"layers \(0\) must be a positive integer"):
        pipe.generate([GenerationParams(prompt="x", images=[_rgba()], layers=0)])


def test_layers_on_a_flat_model_is_an_error(tiny_checkpoints):
    pipe = load_pipeline(tiny_checkpoints["edit"], ParallelState.single())
    with pytest.raises(ValueError, match="layers is only for layered models"):
        pipe.generate([GenerationParams(prompt="x", images=[_rgba().convert("RGB")], layers=2)])


def test_preview_is_the_composite_frame(checkpoint):
    pipe = load_pipeline(checkpoint, ParallelState.single())
    events = []
    params = GenerationParams(**dict(CFG, num_inference_steps=3, partial_images=1))
    result = pipe.generate([params], lambda event: events.append(event) and False)[0]
    previews = [e.previews for e in events if e.previews]
    assert len(previews) == 1 and len(previews[0]) == 1  # one per request, not per layer
    assert previews[0][0].mode == "RGBA" and previews[0][0].size == (96, 96)
    assert len(result.images) == 3
