"""LoRA adapters under every layout on Qwen-Image and Wan2.2 equal one rank.

Ulysses 2, Ring 2 and CFG-parallel 2 run in one 2-rank gloo task, hybrid 2x2 in one
4-rank task, each for both families (keeps the suite fast: one pool call per world
size). Qwen-Image: a kohya/ComfyUI adapter and a diffusers-format one stacked, with
true CFG; Wan2.2 T2V-A14B: one adapter on both experts and one on the high-noise
expert only. Both touch ``proj_out``, the layer the plan gathers at (the hooks must
follow peft's wrapper). Final latents within 1e-4 of one rank, images and frames within
1/255. Tiny checkpoints, 32x32 px images, 48x48 px x 9 frames videos, 2 steps.
"""

from __future__ import annotations

import pytest

from ithaca.testing.lora import random_lora, save_safetensors, to_comfy
from ithaca.types import LoraRef
from tests.models.harness import (
    check_layout,
    generate,
    max_frame_diff,
    max_image_diff,
    tiny_wan_paths,
)
from tests.models.test_lora_families import wan_generate

TWO_RANKS = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2),
             "cfg2": dict(cfg_parallel_size=2)}  # fmt: skip
HYBRID = {"hybrid2x2": dict(ulysses_degree=2, ring_degree=2)}
QWEN_REQUEST = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0, width=32,
                    height=32, num_inference_steps=2, seed=5, request_id="q",
                    lora=(LoraRef("style", 0.9), LoraRef("extra", -0.5)))  # fmt: skip
WAN_REQUEST = dict(prompt="a red cat walks on a blue street", negative_prompt="blurry",
                   num_frames=9, width=48, height=48, num_inference_steps=2, guidance_scale=4.0,
                   guidance_scale_2=2.0, seed=21,
                   lora=(LoraRef("w", 0.7), LoraRef("v", 1.2, "high_noise")))  # fmt: skip
WAN_TARGETS = ("attn1.to_q", "attn2.to_v", "ffn.net.2", "proj_out")


@pytest.fixture(scope="module")
def cases(tiny_checkpoints, tmp_path_factory):
    """Both families' checkpoints, adapters and 1-rank results."""
    from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel

    root = tmp_path_factory.mktemp("lora_layouts")
    qwen = tiny_checkpoints["t2i"]
    model = QwenImageTransformer2DModel.from_pretrained(qwen, subfolder="transformer")
    qwen_loras = (
        ("style", save_safetensors(to_comfy(random_lora(model, seed=6)), root / "s.safetensors"),
         1.0),
        ("extra", save_safetensors(random_lora(model, seed=7, targets=("proj_out", "to_k")),
                                   root / "e.safetensors"), 1.0),
    )  # fmt: skip
    wan = tiny_wan_paths(root / "wan")["t2v_a14b"]
    model = WanTransformer3DModel.from_pretrained(wan, subfolder="transformer")
    wan_loras = tuple(
        (name, save_safetensors(random_lora(model, seed=seed, targets=WAN_TARGETS),
                                root / f"{name}.safetensors"), 1.0)
        for name, seed in (("w", 8), ("v", 9))
    )  # fmt: skip
    args = (qwen, qwen_loras, wan, wan_loras)
    return args, run_layouts({"one": {}}, *args)["one"]


def run_layouts(layouts: dict, qwen, qwen_loras, wan, wan_loras) -> dict:
    """Every layout of ``layouts`` on this rank, for both families (one pool task)."""
    return {
        name: (generate(layout, qwen, [QWEN_REQUEST], None, qwen_loras),
               wan_generate(layout, wan, [WAN_REQUEST], wan_loras))
        for name, layout in layouts.items()
    }  # fmt: skip


def _check(per_rank: list, one: tuple, layout: dict) -> None:
    sp = layout.get("ulysses_degree", 1) * layout.get("ring_degree", 1) > 1
    check_layout([r[0] for r in per_rank], one[0], gathered=["proj_out[0]"] if sp else [])
    frames, latents, _ = per_rank[0][1]
    err = (latents - one[1][1]).abs().max().item()
    assert err <= 1e-4, f"Wan final latents differ from 1 rank by {err:.2e}"
    assert max_frame_diff(frames[0], one[1][0][0]) <= 1
    expect = [["proj_out[0]"], ["proj_out[0]"]] if sp else [[], []]
    assert all(r[1][2] == expect for r in per_rank), [r[1][2] for r in per_rank]


@pytest.mark.parametrize("layouts", [TWO_RANKS, HYBRID], ids=["two_ranks", "hybrid2x2"])
def test_layouts_with_adapters_equal_one_rank(worker_pool, cases, layouts):
    args, one = cases
    world = 4 if layouts is HYBRID else 2
    results = worker_pool(world).run(run_layouts, layouts, *args, timeout=900)
    for name, layout in layouts.items():
        _check([rank[name] for rank in results], one, layout)


def test_the_adapters_change_the_outputs(cases):
    (qwen, _, wan, _), one = cases
    base_qwen = generate({}, qwen, [dict(QWEN_REQUEST, lora=())])
    assert max_image_diff(one[0][0][0], base_qwen[0][0]) > 8
    base_wan = wan_generate({}, wan, [dict(WAN_REQUEST, lora=())], ())
    assert max_frame_diff(one[1][0][0], base_wan[0][0]) > 8
