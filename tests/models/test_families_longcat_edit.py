"""LongCat-Image-Edit: 1 rank equals diffusers' LongCatImageEditPipeline; every layout
equals 1 rank.

Pyramid: an in-process 1-rank run against the diffusers reference (fp32 latents within
1e-5, images within 1/255); then 2- and 4-rank gloo runs against our 1-rank run
(latents within 1e-4, images within 1/255). Same plan and processor as FLUX.1.

Both pipelines size the output from the input's aspect ratio at an area (1024^2 px in
the real pipeline; 3200 px here, on both sides: our default size's area): a 64x40 input
gives an 80x48 output, 5x3 = 15 noise tokens followed by the input image's 15 tokens. 30 does not
divide by 4 (hybrid pads to 32); at 2 ranks no edit sequence can be odd (noise and
image tokens come in equal numbers).
"""

import numpy as np
import pytest
from PIL import Image

from ithaca.models.longcat_image.pipeline import LongCatImageEditPipeline
from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.types import GenerationParams
from tests.models.harness import (
    FLUX_STYLE_HOOKS,
    LAYOUTS,
    check_family_layout,
    check_family_reference,
    generate,
    world_size,
)

AREA = 3200
ATTRS = {"default_width": 80, "default_height": 40}  # the default size's area: AREA px


def _batch():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8))
    return [dict(prompt="make it 'red'", negative_prompt="blurry", true_cfg_scale=4.0,
                 num_inference_steps=2, seed=3, num_images=2, images=[image],
                 request_id="edit")]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tiny_family):
    return tiny_family(LongCatImageEditPipeline)


@pytest.fixture(scope="module")
def one_rank(checkpoint):
    return generate({}, checkpoint, _batch(), ATTRS)


def test_one_rank_matches_diffusers(checkpoint, one_rank):
    assert one_rank[1][0].shape == (2, 15, 64)  # 80x48 px output: 5x3 packed tokens
    check_family_reference("LongCat-Image-Edit", checkpoint, _batch()[0], one_rank, 0,
                           target_area=AREA)  # fmt: skip


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_rank(worker_pool, checkpoint, one_rank, name):
    layout = LAYOUTS[name]
    # 15 noise + 15 image tokens: padded to 32 at 4 ranks, unpadded at 2.
    hooks = dict(FLUX_STYLE_HOOKS, valid={32: 30} if world_size(layout) == 4 else {})
    check_family_layout(worker_pool, "LongCat-Image-Edit", name, layout, checkpoint, _batch(),
                        one_rank, hooks, ATTRS)  # fmt: skip


def test_a_requested_size_wins_over_the_input_aspect(checkpoint):
    # The one size rule of every family: the request's size, else (an edit) the input's
    # aspect ratio at the default area; diffusers' LongCat-Edit takes no size at all.
    pipe = load_pipeline(checkpoint, ParallelState.single())
    for name, value in ATTRS.items():
        setattr(pipe, name, value)
    image = _batch()[0]["images"][0]  # 64x40 px
    sized = pipe.resolve(GenerationParams(prompt="x", images=[image]))
    assert (sized.width, sized.height) == (80, 48)
    asked = pipe.resolve(GenerationParams(prompt="x", images=[image], width=70, height=40))
    assert (asked.width, asked.height) == (64, 32)  # rounded down to multiples of 16
