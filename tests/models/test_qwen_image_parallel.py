"""Every parallel layout of the Qwen-Image pipeline equals the 1-rank pipeline.

Pyramid: plan/registry/1-rank-vs-diffusers in test_qwen_image.py (no processes); here
2-, 4- and 8-rank gloo runs of the whole pipeline (text encoder on rank 0, broadcast
embeddings, sharded transformer, CFG-parallel, decode on rank 0). The image grid (3x3
latent patches) and the prompt lengths divide by none of the world sizes, so every
sharded run pads (``auto_pad``). Tolerances: final latents max abs <= 1e-4 (fp32; the
sum order of attention changes with the layout), images within 1/255. Also: every
sharded run did shard and gather (no silent fallback), the encoders live on the
returning rank only, a failure and a cancel decision on that rank reach every rank.
"""

import numpy as np
import pytest
from PIL import Image

from tests.models.harness import (
    EDIT_AREA,
    cancel_after_first_step,
    fail_on_rank0,
    generate_fused,
    record,
)

# Two requests in one batch: different prompt lengths (padded text with a mask),
# true CFG, two images for the first request.
T2I_BATCH = [
    dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0, width=96,
         height=96, num_inference_steps=2, seed=11, num_images=2, request_id="a"),
    dict(prompt="a small blue bird near a tree", negative_prompt="dark", true_cfg_scale=4.0,
         width=96, height=96, num_inference_steps=2, seed=12, request_id="b"),
]  # fmt: skip

LAYOUTS_2 = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2),
             "cfg2": dict(cfg_parallel_size=2),
             "ulysses2_vae2": dict(ulysses_degree=2, vae_patch_parallel_size=2)}  # fmt: skip
LAYOUTS_4 = {
    "ulysses4": dict(ulysses_degree=4),
    "ring4": dict(ring_degree=4),
    "hybrid2x2": dict(ulysses_degree=2, ring_degree=2),
    "cfg2_ulysses2": dict(cfg_parallel_size=2, ulysses_degree=2),
}
LATENT_TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    return generate_fused({}, tiny_checkpoints["t2i"], T2I_BATCH)


def check(results, reference, layout):
    ref_images, ref_latents, _ = reference
    sp = layout.get("ulysses_degree", 1) * layout.get("ring_degree", 1)
    for _, _, info in results:
        # Not a silent fallback to an unsharded run: the plan's hooks acted on every rank.
        sharded = ["pos_embed[0]", "transformer_blocks.0.hidden_states"] if sp > 1 else []
        assert info["sharded"] == sharded
        assert info["gathered"] == (["proj_out[0]"] if sp > 1 else [])
    images, latents, _ = results[0]
    err = (latents - ref_latents).abs().max().item()
    assert err <= LATENT_TOL, f"final latents differ by {err:.2e}"
    assert len(images) == len(ref_images)
    worst = 0
    for got, want in zip(images, ref_images, strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            diff = int(np.abs(a.astype(int) - b.astype(int)).max())
            assert diff <= 1, f"images differ by {diff}/255"
            worst = max(worst, diff)
    vae_ranks = layout.get("vae_patch_parallel_size", 1)
    for rank, (images, latents, info) in enumerate(results[1:], 1):
        assert all(not im for im in images)  # only the returning rank returns anything
        # The text encoder lives on the returning rank only; the VAE on its VAE group,
        # whose other ranks took part in the (split) decode.
        assert not info["has_text_encoder"] and info["has_vae"] == (rank < vae_ranks)
        assert (latents is not None) == (rank < vae_ranks)
    assert results[0][2]["has_text_encoder"] and results[0][2]["has_vae"]
    return err, worst


@pytest.mark.parametrize("name", LAYOUTS_2)
def test_two_ranks(worker_pool, tiny_checkpoints, reference, name):
    layout = LAYOUTS_2[name]
    results = worker_pool(2).run(generate_fused, layout, tiny_checkpoints["t2i"], T2I_BATCH)
    record("Qwen-Image", name, *check(results, reference, layout))


@pytest.mark.parametrize("name", LAYOUTS_4)
def test_four_ranks(worker_pool, tiny_checkpoints, reference, name):
    layout = LAYOUTS_4[name]
    results = worker_pool(4).run(generate_fused, layout, tiny_checkpoints["t2i"], T2I_BATCH)
    record("Qwen-Image", name, *check(results, reference, layout))


@pytest.mark.slow
@pytest.mark.serial  # 8 ranks on 2 cores: alone, not beside an xdist worker
def test_eight_ranks_cfg_ulysses_ring(worker_pool, tiny_checkpoints, reference):
    layout = dict(cfg_parallel_size=2, ulysses_degree=2, ring_degree=2)
    results = worker_pool(8).run(generate_fused, layout, tiny_checkpoints["t2i"], T2I_BATCH)
    record("Qwen-Image", "cfg2_ulysses2_ring2", *check(results, reference, layout))


def _edit_inputs():
    rng = np.random.default_rng(3)
    first = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    second = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    return [first, second]


def test_edit_two_images_hybrid(worker_pool, tiny_checkpoints):
    # Noise tokens followed by both input images' tokens, all sharded together.
    batch = [dict(prompt="make it red", negative_prompt=" ", true_cfg_scale=4.0, width=96,
                  height=64, num_inference_steps=2, seed=5, images=_edit_inputs())]  # fmt: skip
    path = tiny_checkpoints["edit_plus"]
    reference = generate_fused({}, path, batch, EDIT_AREA)
    layout = dict(ulysses_degree=2, ring_degree=2)
    results = worker_pool(4).run(generate_fused, layout, path, batch, EDIT_AREA)
    record("Qwen-Image-Edit-2509", "hybrid2x2", *check(results, reference, layout))


def generate_counting_splits(layout: dict, path: str, batch: list[dict]):
    """``generate`` plus the shapes this rank ran through the split VAE (encode, decode)."""
    import ithaca.parallel.vae as vae_parallel

    shapes, run = [], vae_parallel.run_split

    def counting(vae, fn, x, axis, unit=1):
        shapes.append(tuple(x.shape))
        return run(vae, fn, x, axis, unit)

    vae_parallel.run_split = counting
    try:
        return generate_fused(layout, path, batch), shapes
    finally:
        vae_parallel.run_split = run


def test_edit_with_the_vae_split_over_two_ranks(worker_pool, tiny_checkpoints):
    # The input image is encoded and the output decoded by both ranks, rows split.
    batch = [dict(prompt="make it red", negative_prompt=" ", true_cfg_scale=4.0, width=96,
                  height=64, num_inference_steps=2, seed=5, images=_edit_inputs()[:1])]  # fmt: skip
    path = tiny_checkpoints["edit"]
    reference = generate_fused({}, path, batch)
    layout = dict(ulysses_degree=2, vae_patch_parallel_size=2)
    runs = worker_pool(2).run(generate_counting_splits, layout, path, batch)
    record("Qwen-Image-Edit", "ulysses2_vae2", *check([r for r, _ in runs], reference, layout))
    for _, shapes in runs:  # an encode (pixels, 5-D), then the decode (latents)
        assert len(shapes) == 2 and shapes[0][-2] > shapes[1][-2], shapes


def test_a_failure_on_the_returning_rank_reaches_every_rank(worker_pool, tiny_checkpoints):
    errors = worker_pool(2).run(fail_on_rank0, LAYOUTS_2["ulysses2"], tiny_checkpoints["t2i"])
    assert errors[0] == "ValueError: tokenizer exploded"
    assert errors[1] == "ValueError: conditioning failed on rank 0: tokenizer exploded"


def test_cancel_decision_reaches_every_rank(worker_pool, tiny_checkpoints):
    layout = dict(cfg_parallel_size=2)
    results = worker_pool(2).run(cancel_after_first_step, layout, tiny_checkpoints["t2i"])
    # The flag is read one step late (no host sync per step): both ranks stop after step 2.
    assert results[0] == ([1, 2], True, 2)  # the callback runs on the returning rank only
    assert results[1] == ([], True, 2)  # the other rank stopped at the same step
