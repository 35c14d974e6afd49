"""SD3.5, Ovis-Image, LongCat-Image: 1 rank equals diffusers; every layout equals 1 rank.

Pyramid: in-process 1-rank runs against each family's diffusers reference (fp32
latents within 1e-5, images within 1/255); then 2- and 4-rank gloo runs of the whole
pipeline against our 1-rank run (latents within 1e-4, images within 1/255). The tiny
checkpoint is the spec's recipe, built once per session.

The image is 28x20 px: 7x5 = 35 packed tokens, divisible by none of the
sequence-parallel sizes (``auto_pad``). The batch has a CFG request (two images) and one
with CFG off (scale 1). LongCat's prompt has a quoted span (tokenized per character) and
its CFG renorm; Ovis-Image and LongCat-Image reuse FLUX.1's plan and processor.
"""

import pytest
from PIL import Image

from ithaca.models.longcat_image.pipeline import LongCatImagePipeline
from ithaca.models.ovis_image.pipeline import OvisImagePipeline
from ithaca.models.registry import load_pipeline
from ithaca.models.sd3.pipeline import StableDiffusion3Pipeline
from ithaca.parallel import ParallelState
from ithaca.types import GenerationParams
from tests.models.harness import (
    CFG_REQUEST,
    FLUX_STYLE_HOOKS,
    LAYOUTS,
    NO_CFG_REQUEST,
    check_family_layout,
    check_family_reference,
    generate,
)

SD3_HOOKS = dict(sharded=["transformer_blocks.0.hidden_states"], gathered=["proj_out[0]"],
                 valid={36: 35})  # fmt: skip
FAMILIES = {
    "SD3.5": (StableDiffusion3Pipeline, [CFG_REQUEST, NO_CFG_REQUEST], SD3_HOOKS),
    "Ovis-Image": (OvisImagePipeline, [CFG_REQUEST, NO_CFG_REQUEST], FLUX_STYLE_HOOKS),
    "LongCat-Image": (
        LongCatImagePipeline,
        [dict(CFG_REQUEST, prompt="a red cat 'on' a mat"), NO_CFG_REQUEST],
        FLUX_STYLE_HOOKS,
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_family):
    """``(name, checkpoint, batch, hooks, one-rank run)`` of each family in turn."""
    pipeline, batch, hooks = FAMILIES[request.param]
    checkpoint = tiny_family(pipeline)
    return request.param, checkpoint, batch, hooks, generate({}, checkpoint, batch)


@pytest.mark.parametrize("index", [0, 1], ids=["cfg", "no_cfg"])
def test_one_rank_matches_diffusers(family, index):
    name, checkpoint, batch, _, one_rank = family
    check_family_reference(name, checkpoint, batch[index], one_rank, index)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_one_rank(worker_pool, family, layout):
    name, checkpoint, batch, hooks, one_rank = family
    check_family_layout(worker_pool, name, layout, LAYOUTS[layout], checkpoint, batch, one_rank,
                        hooks)  # fmt: skip


def test_sd3_request_validation(tiny_family):
    resolve = load_pipeline(tiny_family(StableDiffusion3Pipeline), ParallelState.single()).resolve
    # diffusers' name for the CFG scale is accepted; CFG is on above 1, as in diffusers.
    request = resolve(GenerationParams(prompt="a cat", guidance_scale=5.0, width=30, height=21))
    assert request.do_cfg and request.true_cfg_scale == 5.0
    assert (request.width, request.height) == (28, 20)  # rounded down to multiples of 4
    assert not resolve(GenerationParams(prompt="a cat", true_cfg_scale=1.0)).do_cfg
    with pytest.raises(ValueError, match="differ"):
        resolve(GenerationParams(prompt="a cat", guidance_scale=5.0, true_cfg_scale=4.0))
    with pytest.raises(ValueError, match="width"):
        resolve(GenerationParams(prompt="a cat", width=3))
    with pytest.raises(ValueError, match="input images"):
        resolve(GenerationParams(prompt="a cat", images=[Image.new("RGB", (8, 8))]))
    with pytest.raises(ValueError, match="prompt"):
        resolve(GenerationParams(prompt=""))
