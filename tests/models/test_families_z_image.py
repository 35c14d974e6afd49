"""Z-Image: 1 rank equals diffusers' ZImagePipeline; every layout equals 1 rank.

Pyramid: the plan and head padding without processes; in-process 1-rank runs against
the diffusers reference (fp32 latents within 1e-5, images within 1/255); then 2- and
4-rank gloo runs of the whole pipeline against our 1-rank run: final latents within
1e-4, images within 1/255. The tiny transformer has Z-Image's 30 heads, so Ulysses 4
runs with two appended zero heads.

Z-Image pads the image and the caption to multiples of 32 tokens itself (35 image
patches -> 64 tokens, captions -> 32), so its sequences divide by 2 and 4; the 3-rank
Ulysses run is the one where ``auto_pad`` pads (image 64 -> 66 tokens in the refiner)
and masks the padding. The batch mixes a request without CFG (Turbo's
default, two images) and one with CFG and a negative prompt.
"""

from types import SimpleNamespace

import pytest
import torch

from ithaca.models.registry import load_pipeline
from ithaca.models.z_image.pipeline import ZImagePipeline
from ithaca.models.z_image.transformer import pad_heads, z_image_sp_plan
from ithaca.parallel import ParallelState, validate_sp_plan
from ithaca.types import GenerationParams
from tests.models.harness import LAYOUTS as FAMILY_LAYOUTS
from tests.models.harness import check_family_layout, check_family_reference, generate

TURBO = dict(prompt="a red cat", width=28, height=20, num_inference_steps=2, seed=3,
             num_images=2, request_id="turbo")  # fmt: skip
CFG = dict(prompt="a small blue bird near a tree", negative_prompt="blurry",
           true_cfg_scale=3.0, width=28, height=20, num_inference_steps=2, seed=4,
           request_id="cfg")  # fmt: skip
# Same settings as TURBO, so one loop (and one forward) with it: its caption pads to 64
# tokens, TURBO's to 32, so the unified sequences carry a key mask through the shards.
LONG = dict(TURBO, prompt=" ".join(["a small red bird near a blue tree on a dark street"] * 4),
            num_images=1, seed=5, request_id="long")  # fmt: skip
BATCH = [TURBO, CFG, LONG]
FUSED = {"fuse_batches": True}  # TURBO and LONG share forwards (exercises caption masks)
LAYOUTS = {
    **FAMILY_LAYOUTS,
    "ulysses4": dict(ulysses_degree=4),  # 30 heads: padded to 32
    "ulysses3": dict(ulysses_degree=3),  # 64 refiner tokens: padded to 66
}
# Each tensor is listed once: later blocks reuse the shard of the same tensor.
SHARDED = ["noise_refiner.0.x", "noise_refiner.0.freqs_cis", "layers.0.x", "layers.0.freqs_cis"]


@pytest.fixture(scope="module")
def checkpoint(tiny_family):
    return tiny_family(ZImagePipeline)


@pytest.fixture(scope="module")
def one_rank(checkpoint):
    return generate({}, checkpoint, BATCH, FUSED)


def test_plan_is_valid_and_gathers_every_shard():
    config = SimpleNamespace(n_refiner_layers=2, all_patch_size=(2,), all_f_patch_size=(1,))
    plan = z_image_sp_plan(config)
    validate_sp_plan(plan)
    assert set(plan) == {"noise_refiner.0", "noise_refiner.*", "noise_refiner.1", "layers.0",
                         "layers.*", "all_final_layer.2-1"}  # fmt: skip


def test_pad_heads_appends_zero_heads():
    x = torch.randn(2, 5, 30, 8)
    padded = pad_heads(x, 4)
    assert padded.shape == (2, 5, 32, 8)
    assert torch.equal(padded[:, :, :30], x) and not padded[:, :, 30:].any()
    assert pad_heads(x, 3) is x


@pytest.mark.parametrize("index", [0, 1, 2], ids=["turbo", "cfg", "long_caption"])
def test_one_rank_matches_diffusers(checkpoint, one_rank, index):
    check_family_reference("Z-Image", checkpoint, BATCH[index], one_rank, index)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_rank(worker_pool, checkpoint, one_rank, name):
    # What the plan's hooks did on every rank (sharded layouts); only at 3 ranks is
    # anything padded: the refiner's 64 image tokens to 66.
    hooks = dict(sharded=SHARDED, gathered=["noise_refiner.1[0]", "all_final_layer.2-1[0]"],
                 valid={66: 64} if name == "ulysses3" else {})  # fmt: skip
    check_family_layout(worker_pool, "Z-Image", name, LAYOUTS[name], checkpoint, BATCH, one_rank,
                        hooks, FUSED)  # fmt: skip


def test_request_validation(checkpoint):
    pipe = load_pipeline(checkpoint, ParallelState.single())
    # Turbo's default: no CFG; any positive scale turns it on (diffusers: scale > 0).
    assert not pipe.resolve(GenerationParams(prompt="a cat")).do_cfg
    assert pipe.resolve(GenerationParams(prompt="a cat", guidance_scale=0.5)).do_cfg
    with pytest.raises(ValueError, match="differ"):
        pipe.resolve(GenerationParams(prompt="a cat", guidance_scale=1.0, true_cfg_scale=2.0))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe.resolve(GenerationParams(prompt="a cat", num_inference_steps=-1))
