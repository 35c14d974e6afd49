"""FLUX.1: 1 rank equals diffusers' FluxPipeline; every layout equals 1 rank.

Pyramid: in-process 1-rank runs against the diffusers reference (fp32 latents within
1e-5, images within 1/255); then 2- and 4-rank gloo runs of the whole pipeline
(text encoders on rank 0, broadcast embeddings, sharded transformer, CFG-parallel when
a request uses true CFG, decode on rank 0) against our 1-rank run: final latents
within 1e-4 (the sum order of attention changes with the layout), images within 1/255.

The image is 28x20 px: 7x5 = 35 packed latent tokens, which divides by none of the
sequence-parallel sizes, so every sharded run pads (``auto_pad``). The batch has a
request with true CFG (its own loop, two images) and one with embedded guidance only.
"""

import pytest

from ithaca.models.flux.pipeline import FluxPipeline
from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.types import GenerationParams
from tests.models.harness import (
    FLUX_STYLE_HOOKS,
    LAYOUTS,
    check_family_layout,
    check_family_reference,
    generate,
)

CFG = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0,
           guidance_scale=3.5, width=28, height=20, num_inference_steps=2, seed=11,
           num_images=2, request_id="cfg")  # fmt: skip
DISTILLED = dict(prompt="a small blue bird near a tree", guidance_scale=2.0, width=28,
                 height=20, num_inference_steps=2, seed=12, request_id="distilled")  # fmt: skip
BATCH = [CFG, DISTILLED]


@pytest.fixture(scope="module")
def checkpoints(tiny_family):
    return {
        "dev": tiny_family(FluxPipeline),
        "schnell": tiny_family(FluxPipeline, seed=1, guidance_embeds=False),
    }


@pytest.fixture(scope="module")
def one_rank(checkpoints):
    return generate({}, checkpoints["dev"], BATCH)


@pytest.mark.parametrize("index", [0, 1], ids=["true_cfg", "embedded_guidance"])
def test_one_rank_matches_diffusers(checkpoints, one_rank, index):
    check_family_reference("FLUX.1-dev", checkpoints["dev"], BATCH[index], one_rank, index)


def test_batched_guidance_scales_match_diffusers(checkpoints):
    # Two requests in one loop (same size, steps, no true CFG) with different embedded
    # guidance: the guidance input is per row, each equals its own diffusers run.
    other = dict(DISTILLED, prompt="a dark city street", guidance_scale=5.0, seed=13,
                 request_id="g5")  # fmt: skip
    batch = [DISTILLED, other]
    ours = generate({}, checkpoints["dev"], batch, attrs={"fuse_batches": True})
    assert ours[2]["metadata"][0]["timings"] == ours[2]["metadata"][1]["timings"]  # one loop
    for index, request in enumerate(batch):
        check_family_reference("FLUX.1-dev", checkpoints["dev"], request, ours, index)


def test_schnell_matches_diffusers(checkpoints):
    request = dict(DISTILLED, guidance_scale=None, num_inference_steps=3)
    ours = generate({}, checkpoints["schnell"], [request])
    reference = dict(request, guidance_scale=0.0)  # diffusers' "no embedded guidance"
    check_family_reference("FLUX.1-schnell", checkpoints["schnell"], reference, ours, 0)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_rank(worker_pool, checkpoints, one_rank, name):
    layout = LAYOUTS[name]
    check_family_layout(worker_pool, "FLUX.1-dev", name, layout, checkpoints["dev"], BATCH,
                        one_rank, FLUX_STYLE_HOOKS)  # fmt: skip


def test_request_validation(checkpoints):
    dev = load_pipeline(checkpoints["dev"], ParallelState.single())
    # True CFG is opt-in: a scale above 1 and a negative prompt.
    assert not dev.resolve(GenerationParams(prompt="a cat", true_cfg_scale=4.0)).do_cfg
    assert dev.resolve(
        GenerationParams(prompt="a cat", negative_prompt="", true_cfg_scale=4.0)
    ).do_cfg
    assert not dev.resolve(GenerationParams(prompt="a cat", negative_prompt="x")).do_cfg
    with pytest.raises(ValueError, match="height"):
        dev.resolve(GenerationParams(prompt="a cat", height=2))
    schnell = load_pipeline(checkpoints["schnell"], ParallelState.single())
    assert schnell.resolve(GenerationParams(prompt="a cat")).steps == 4  # timestep-distilled


def test_runtime_remove_leaves_no_hooks(checkpoints):
    """``parallelize`` hooks the model and its single-stream blocks; ``remove()`` takes
    every one of those hooks off again (the blocks' text-length pre-hooks included)."""
    from ithaca.models.flux.transformer import FLUX_ATTENTION, FluxTransformer2DModel
    from ithaca.runtime.parallelize import parallelize

    model = FluxTransformer2DModel.from_pretrained(checkpoints["dev"], subfolder="transformer")

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    before = hooks()
    runtime = parallelize(model, ParallelState.single(), FLUX_ATTENTION)
    assert hooks() > before + len(model.single_transformer_blocks) - 1
    runtime.remove()
    assert hooks() == before


def test_flux_rope_split_rotates_as_diffusers_to_the_bit():
    """The joint processor rotates FLUX's ``(cos, sin)`` RoPE in the real pair form of
    ``rotary.apply_rope``, text and image apart: bit for bit diffusers' rotation of the
    joint ``[text, image]`` sequence."""
    import torch
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from ithaca.models.attention import flux_rope
    from ithaca.models.rotary import apply_rope

    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.zeros(5, 3), torch.randint(0, 9, (12, 3), generator=g).float()])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(ids)  # (17, 16) each
    x = torch.randn(2, 17, 3, 16, generator=g)  # (B, T + S, H, D), T = 5
    text, image = flux_rope((cos, sin), 5)
    ours = torch.cat([apply_rope(x[:, :5], text), apply_rope(x[:, 5:], image)], dim=1)
    assert torch.equal(ours, apply_rotary_emb(x, (cos, sin), sequence_dim=1))
