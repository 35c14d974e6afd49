"""Bagel against the official implementation's recorded runs (``bagel-golden``).

Pyramid: loader key mapping and position tables (no model run); every stored tensor of
the four fp32 cases within the README's tolerance (KV caches, prefill rows / outputs,
per-step branch velocities, combined velocities, final latent, decoded image, uint8
image within 1 level); the bf16 run within the README's bf16 bounds. One process, CPU.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from tests.models._bagel_golden import (
    CHECKPOINT,
    FP32_CASES,
    GOLDEN,
    assert_close,
    image_levels,
    load_case,
    psnr,
    requires_golden,
)
from tests.models.harness import record

pytestmark = requires_golden
MARKERS = (329, 330)


@pytest.fixture(scope="module")
def parts():
    from ithaca.models.bagel import loader

    over = loader.overrides(CHECKPOINT)
    model = loader.load_weights(loader.build(CHECKPOINT), CHECKPOINT, torch.float32, "cpu")
    return model, loader.load_vae(CHECKPOINT, over, "cpu"), loader.image_limits(over)


def run_case(parts, name: str, model=None):
    """Our run of a case: (case, reference tensors, our tensors by the fixture's names)."""
    from ithaca.models.bagel import inputs, sampling
    from ithaca.models.base import seeded_noise

    base, vae, (vae_lim, vit_lim) = parts
    model = model or base
    device = model.vae2llm.weight.device
    case, ref = load_case(name)
    ours: dict[str, torch.Tensor] = {}
    image = None
    if case["task"] == "edit":
        source = Image.open(GOLDEN / "cases" / name / "input.png")
        image = inputs.encode_image(model, vae, source, vae_lim, vit_lim, "cpu")
        vit_pos = sampling.latent_positions(*image["vit_grid"], 70)
        assert torch.equal(vit_pos, ref["input.vit_position_ids"])
        assert torch.equal(
            sampling.latent_positions(*image["vae_grid"], 64), ref["input.vae_position_ids"]
        )
        with torch.no_grad():
            vit_hidden = model.vit_hidden(image["vit_patches"], vit_pos)
            ours["input.connector_out"] = model.connector(vit_hidden)
        ours["input.vit_hidden"] = vit_hidden
        ours["input.vit_patches"] = image["vit_patches"]
        ours["input.vae_pixels"] = inputs.to_pixels(inputs.resized(source, vae_lim))
        ours["input.vae_latent"] = sampling.unpatchify(image["vae_tokens"], *image["vae_grid"])
    params = sampling.SamplingParams(**case["params"])  # cfg_interval: a JSON list
    block = torch.tensor([321, *case["token_ids"]["prompt"], 322], device=device)
    with torch.no_grad():
        run, segments = model.run, []  # each prefill segment: rows, positions, output

        def recorded(rows, positions, *args, **kwargs):
            segments.append((rows, positions, run(rows, positions, *args, **kwargs)))
            return segments[-1][2]

        model.run = recorded
        try:
            contexts = sampling.build_contexts(model, block, MARKERS, image)
        finally:
            del model.run
        h, w = (s // 16 for s in case["image_hw"])
        ours["noise"] = seeded_noise((h * w, 64), case["seed"], torch.float32, "cpu")
        assert torch.equal(ours["noise"], ref["noise"])  # a seed means the same picture
        schedule = sampling.scheduler(params, device)
        ours["timesteps"] = schedule.sigmas.cpu()
        guided = [sampling.guided(t, params) for t in schedule.timesteps.tolist()]
        pos = sampling.latent_positions(h, w, 64, device)
        query = sampling.Query(contexts, pos, params, guided, MARKERS)
        x = ours["noise"].to(device)
        for i, t in enumerate(schedule.timesteps):  # the pipeline's loop (shared: base.py)
            v, branches = query.velocity(model, x, t, i)
            ours.update({f"step.{i}.x_t": x.cpu(), f"step.{i}.v": v.cpu()})
            ours.update({f"step.{i}.v_{name}": value.cpu() for name, value in branches.items()})
            x = schedule.step(v, t, x, return_dict=False)[0]
        x = x.cpu()
        ours["final.latent_tokens"] = x
        latent, decoded, u8 = inputs.decode_tokens(vae, x, (h, w))
    ours.update({"final.latent": latent, "final.vae_decoded": decoded})
    return case, ref, ours, contexts, segments, u8


@requires_golden
def test_loader_maps_every_key_and_rejects_a_missing_one(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ithaca.models.bagel import loader

    model = loader.build(CHECKPOINT)
    ema = f"{CHECKPOINT}/ema.safetensors"
    with safe_open(ema, "pt") as f:
        keys = set(f.keys())
    assert set(model.state_dict()) | loader.SKIPPED_KEYS == keys  # every key read, none left
    assert loader.is_bagel_checkpoint(CHECKPOINT) and not loader.is_bagel_checkpoint(str(tmp_path))

    broken = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, broken, ignore=shutil.ignore_patterns("ema.safetensors"))
    tensors = load_file(ema)
    del tensors["language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"]
    save_file(tensors, str(broken / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_norm_moe_gen\.weight"):
        loader.load_weights(loader.build(str(broken)), str(broken), torch.float32, "cpu")


def test_position_tables_are_diffusers_sincos(parts):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    model = parts[0]
    for table, grid in ((model.latent_pos_embed, 64), (model.vit_pos_embed, 70)):
        table = table.pos_embed
        expected = get_2d_sincos_pos_embed(
            table.shape[1], grid, base_size=grid, interpolation_scale=1.0, output_type="pt"
        )
        assert torch.equal(table, expected.float())


@pytest.mark.parametrize("name", FP32_CASES)
def test_fp32_case_reproduces_every_tensor(parts, name):
    from ithaca.models.bagel import sampling

    case, ref, ours, contexts, segments, u8 = run_case(parts, name)
    model = parts[0]
    # contexts: the KV caches (fixture layout (layers, L, KV heads, head_dim))
    for branch, ctx in contexts.items():
        if ctx.kv is None:
            assert f"ctx.{branch}.key" not in ref
            continue
        for i, part in enumerate(("key", "value")):
            ours[f"ctx.{branch}.{part}"] = torch.stack([kv[i][0].transpose(0, 1) for kv in ctx.kv])
    # prefill segments in the official call order
    if case["task"] != "edit":  # the official code prefills the prompt again for cfg_img
        segments = segments * 2
    for j, (rows, positions, out) in enumerate(segments):
        ours[f"prefill.{j}.input_embeds"], ours[f"prefill.{j}.output_hidden"] = rows, out
        assert torch.equal(positions, ref[f"prefill.{j}.position_ids"])
    # per-step time embedding and the step-0 query block output per branch
    ts = ours["timesteps"]
    h, w = (s // 16 for s in case["image_hw"])
    pos = sampling.latent_positions(h, w, 64)
    assert torch.equal(pos, ref["query.latent_position_ids"])
    with torch.no_grad():
        for i in range(len(case["steps"])):
            ours[f"step.{i}.t_emb"] = model.t_emb(ts[i])[0]
        for branch, ctx in contexts.items():
            if f"step.0.hidden_{branch}" in ref:
                rows = sampling.marker_block(
                    model, model.embed_latents(ref["noise"], ts[0], pos), *MARKERS
                )
                positions = torch.full((rows.shape[0],), ctx.next_pos)
                assert torch.equal(positions, ref[f"query.{branch}.position_ids"])
                hidden = model.run(rows, positions, slice(1, h * w + 1), False, past=ctx.kv)
                ours[f"step.0.hidden_{branch}"] = hidden
    floats = [k for k, v in ref.items() if v.dtype == torch.float32]
    missing = sorted(set(floats) - set(ours))
    assert not missing, f"tensors not reproduced: {missing}"
    for key in floats:
        assert_close(ours[key], ref[key], f"{name}:{key}")
    levels, share = image_levels(u8, ref["final.image_uint8"])
    assert levels <= 1 and share <= 0.001, (levels, share)
    latent_err = float((ours["final.latent"] - ref["final.latent"]).abs().max())
    record("Bagel", "1 rank vs official", latent_err, levels)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_case_within_readme_bounds(parts, device):
    """bf16 decoder (fp32 ODE state and VAE) vs the fp32 case a: README's GPU bounds."""
    from ithaca.models.bagel import loader

    torch.backends.cuda.matmul.allow_tf32 = False
    bf16 = loader.load_weights(loader.build(CHECKPOINT), CHECKPOINT, torch.bfloat16, device)
    _, ref, ours, *_, u8 = run_case(parts, "a_t2i_64x64", model=bf16)
    _, ref_bf16 = load_case("a_t2i_64x64_bf16")

    def rel_l2(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert rel_l2(ours["final.latent"], ref["final.latent"]) <= 0.05
    assert (ours["final.latent"] - ref["final.latent"]).abs().max() <= 0.3
    for i in range(4):
        assert rel_l2(ours[f"step.{i}.v"], ref[f"step.{i}.v"]) <= 0.1
        assert rel_l2(ours[f"step.{i}.v"], ref_bf16[f"step.{i}.v"]) <= 0.1  # vs official bf16
    assert psnr(u8, ref["final.image_uint8"]) >= 40
    assert image_levels(u8, ref["final.image_uint8"])[0] <= 10
    assert rel_l2(ours["final.latent"], ref_bf16["final.latent"]) <= 0.05
