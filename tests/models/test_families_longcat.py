"""LongCat-Image: 1 rank equals diffusers' LongCatImagePipeline; every layout equals 1 rank.

Pyramid: in-process 1-rank runs against the diffusers reference (called with
``enable_prompt_rewrite=False``, our behaviour; fp32 latents within 1e-5, identical
uint8 images); then 2- and 4-rank gloo runs against our 1-rank run (latents within
1e-4, images within 1/255). LongCat-Image reuses FLUX.1's plan and processor.

The image is 28x20 px: 7x5 = 35 packed tokens, divisible by none of the
sequence-parallel sizes (``auto_pad``). The batch has a CFG request (with a quoted
span, tokenized per character, and CFG renorm) and one with CFG off (scale 1).
"""

import pytest

from ithaca.testing.tiny_families import build_tiny_longcat_image
from tests.models._families_run import (
    CFG_REQUEST,
    FLUX_STYLE_HOOKS,
    LAYOUTS,
    NO_CFG_REQUEST,
    check_family_layout,
    check_reference,
    diffusers_reference,
    generate,
    record,
)

# A quoted span (tokenized per character) and CFG renorm.
CFG = dict(CFG_REQUEST, prompt="a red cat 'on' a mat")
BATCH = [CFG, NO_CFG_REQUEST]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_longcat_image(tmp_path_factory.mktemp("longcat") / "t2i", seed=0))


@pytest.fixture(scope="module")
def one_rank(checkpoint):
    return generate({}, checkpoint, BATCH)


@pytest.mark.parametrize("index", [0, 1], ids=["cfg", "no_cfg"])
def test_one_rank_matches_diffusers(checkpoint, one_rank, index):
    reference = diffusers_reference(checkpoint, BATCH[index])
    err, diff = check_reference(one_rank, index, reference)
    record("LongCat-Image", "1 rank vs diffusers", err, diff)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_rank(worker_pool, checkpoint, one_rank, name):
    layout = LAYOUTS[name]
    check_family_layout(worker_pool, "LongCat-Image", name, layout, checkpoint, BATCH, one_rank,
                        FLUX_STYLE_HOOKS)  # fmt: skip
