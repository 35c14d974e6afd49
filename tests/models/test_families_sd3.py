"""SD3.5: 1 rank equals diffusers' StableDiffusion3Pipeline; every layout equals 1 rank.

Pyramid: in-process 1-rank runs against the diffusers reference (fp32 latents within
1e-5, identical uint8 images); then 2- and 4-rank gloo runs of the whole pipeline
(three text encoders on rank 0, broadcast embeddings, sharded transformer,
CFG-parallel, decode on rank 0) against our 1-rank run: final latents within 1e-4,
images within 1/255.

The tiny transformer has SD3.5-medium's image-only second attention in block 0 and
QK norms. The image is 28x20 px: 7x5 = 35 patch tokens, which divides by none of the
sequence-parallel sizes, so every sharded run pads (``auto_pad``). The batch has a
request with CFG (two images) and one with CFG off (scale 1).
"""

import pytest
from PIL import Image

from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.testing.tiny_families import build_tiny_sd3
from ithaca.types import GenerationParams
from tests.models._families_run import (
    CFG_REQUEST,
    LAYOUTS,
    NO_CFG_REQUEST,
    check_family_layout,
    check_reference,
    diffusers_reference,
    generate,
    record,
)

BATCH = [CFG_REQUEST, NO_CFG_REQUEST]
SD3_HOOKS = dict(sharded=["transformer_blocks.0.hidden_states"], gathered=["proj_out[0]"],
                 valid={36: 35})  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "medium", seed=0))


@pytest.fixture(scope="module")
def one_rank(checkpoint):
    return generate({}, checkpoint, BATCH)


@pytest.mark.parametrize("index", [0, 1], ids=["cfg", "no_cfg"])
def test_one_rank_matches_diffusers(checkpoint, one_rank, index):
    reference = diffusers_reference(checkpoint, BATCH[index])
    err, diff = check_reference(one_rank, index, reference)
    record("SD3.5", "1 rank vs diffusers", err, diff)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_rank(worker_pool, checkpoint, one_rank, name):
    check_family_layout(worker_pool, "SD3.5", name, LAYOUTS[name], checkpoint, BATCH, one_rank,
                        SD3_HOOKS)  # fmt: skip


def test_request_validation(checkpoint):
    pipe = load_pipeline(checkpoint, ParallelState.single())
    resolve = pipe.resolve
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
