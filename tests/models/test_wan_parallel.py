"""Every parallel layout of the Wan2.2 pipelines equals the 1-rank pipeline.

Pyramid: plan, validation, 1-rank-vs-diffusers, MP4 and offload in test_wan.py (no
processes); here 2- and 4-rank gloo runs of whole pipelines (text encoder and VAE on
rank 0, broadcast embeddings, both experts sharded by the plan, CFG-parallel, decode on
rank 0). The A14B grid is 3 latent frames x 3 x 3 patches = 27 tokens (divides by neither
2 nor 4), the TI2V one 3 x 2 x 3 = 18 on 4 ranks, so every sharded run pads
(``auto_pad``). Four steps cross the expert
boundary (999, 900 | 750, 500). Tolerances: final latents max abs <= 1e-4 (fp32; the
attention sum order changes with the layout), frames within 1/255.
"""

import numpy as np
import pytest
from PIL import Image

from tests.models.harness import FAMILIES, generate_video, max_frame_diff, record

LATENT_TOL = 1e-4
T2V = dict(prompt="a red cat walks on a blue street", negative_prompt="blurry", num_frames=9,
           width=48, height=48, num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0,
           seed=21)  # fmt: skip
T2V_BATCH = [T2V]
TWO_RANKS = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2),
             "cfg2": dict(cfg_parallel_size=2)}  # fmt: skip
T2V_SHARDED = ["rope[0]", "rope[1]", "blocks.0.hidden_states"]


def _image():
    rng = np.random.default_rng(4)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def t2v_reference(tiny_wan):
    return generate_video({}, tiny_wan["t2v_a14b"], T2V_BATCH)


def check(results, reference):
    """Rank 0 matches the reference; the other ranks return nothing and hold no encoders."""
    ref_frames, ref_latents, _ = reference
    frames, latents, info = results[0]
    err = (latents - ref_latents).abs().max().item()
    assert err <= LATENT_TOL, f"final latents differ by {err:.2e}"
    assert len(frames) == len(ref_frames)
    frame_err = max(max_frame_diff(g, w) for g, w in zip(frames, ref_frames, strict=True))
    assert frame_err <= 1, f"frames differ by {frame_err}/255"
    assert info["has_text_encoder"] and info["has_vae"]
    for frames, latents, info in results[1:]:
        assert latents is None and all(f is None for f in frames)
        assert not info["has_text_encoder"] and not info["has_vae"]
    # Both experts ran on every rank, in the same order (a collective mismatch would hang).
    assert all(r[2]["experts"] == results[0][2]["experts"] for r in results)
    return err, frame_err


@pytest.mark.parametrize("name", TWO_RANKS)
def test_t2v_two_ranks(worker_pool, tiny_wan, t2v_reference, name):
    layout = TWO_RANKS[name]
    results = worker_pool(2).run(generate_video, layout, tiny_wan["t2v_a14b"], T2V_BATCH)
    record(FAMILIES["t2v_a14b"], name, *check(results, t2v_reference))
    assert set(results[0][2]["experts"]) == {0, 1}
    if "cfg_parallel_size" not in layout:
        # Not a silent fallback to unsharded runs: both experts' hooks acted on each rank.
        for _, _, info in results:
            assert info["sharded"] == [T2V_SHARDED, T2V_SHARDED]
            assert info["gathered"] == [["proj_out[0]"], ["proj_out[0]"]]


def test_t2v_hybrid_2x2(worker_pool, tiny_wan, t2v_reference):
    layout = dict(ulysses_degree=2, ring_degree=2)
    results = worker_pool(4).run(generate_video, layout, tiny_wan["t2v_a14b"], T2V_BATCH)
    record(FAMILIES["t2v_a14b"], "hybrid2x2", *check(results, t2v_reference))


def test_ti2v_image_per_token_timesteps_hybrid_2x2(worker_pool, tiny_wan):
    # 96x64 px through the 16x VAE: 3x2x3 = 18 tokens (padded to 20 on 4 ranks);
    # per-token timesteps (0 on the image's latent frame) are sharded with the tokens.
    batch = [dict(T2V, width=96, height=64, guidance_scale_2=None, images=[_image()], seed=22)]
    path = tiny_wan["ti2v_5b"]
    reference = generate_video({}, path, batch)
    layout = dict(ulysses_degree=2, ring_degree=2)
    results = worker_pool(4).run(generate_video, layout, path, batch)
    err, diff = check(results, reference)
    sharded = [".timestep", *T2V_SHARDED]
    assert all(info["sharded"] == [sharded] for _, _, info in results)
    record(FAMILIES["ti2v_5b"], "hybrid2x2", err, diff)


def test_i2v_ring2(worker_pool, tiny_wan):
    batch = [dict(T2V, images=[_image()], seed=23)]
    path = tiny_wan["i2v_a14b"]
    reference = generate_video({}, path, batch)
    results = worker_pool(2).run(generate_video, dict(ring_degree=2), path, batch)
    record(FAMILIES["i2v_a14b"], "ring2", *check(results, reference))
