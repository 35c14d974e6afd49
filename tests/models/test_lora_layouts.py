"""LoRA adapters under every layout on Qwen-Image and Wan2.2 equal one rank.

Ulysses 2, Ring 2 and CFG-parallel 2 run in one 2-rank gloo task, hybrid 2x2 in one
4-rank task, each for both families (keeps the suite fast: one pool call per world
size). Qwen-Image: a kohya/ComfyUI adapter and a diffusers-format one stacked, with
true CFG; Wan2.2 T2V-A14B: one adapter on both experts and one on the high-noise
expert only. Both touch ``proj_out``, the layer the plan gathers at (the hooks must
follow peft's wrapper); Qwen-Image's diffusers-format one also the AdaLN modulation
``img_mod.1``, which tensor parallel splits by rows and all-gathers (that hook too).
Final latents within 1e-4 of one rank, images and frames within 1/255. Tiny checkpoints,
32x32 px images, 48x48 px x 9 frames videos, 2 steps.

The same 2-rank task runs both families under tensor parallel 2 and HSDP 2 (adapters
split like the weights they touch, :func:`ithaca.runtime.lora_files.split_for_layout`),
switching on one pipeline: base, the stacked pair unfused, fused, one adapter fused
(Wan2.2: on the low-noise expert only), none. Each step equals the same step on one
rank (latents 1e-4, images and frames 1/255); the last equals the first bit for bit
and the base weights (both experts) are bit-identical after; each rank holds less than
the whole adapter. HSDP fuses every set (asserted); every Wan2.2 loop runs both experts
(asserted), so split adapters follow the expert switch, and the targets include the
column-parallel ``attn1.to_q`` ahead of the split QK RMSNorm and the row-parallel
``ffn.net.2``. Wan2.2 under TP 2 with the idle expert on the host (``expert_offload``)
equals one rank resident too. The split rules themselves
(rows of ``lora_B`` on a column-parallel layer, columns of ``lora_A`` on a row-parallel
one, FLUX.1's packed ``proj_out`` block by block, refusals) run without processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.testing.distributed import parallel_state
from ithaca.testing.lora import random_lora, save_safetensors, to_comfy
from ithaca.types import GenerationParams, LoraRef
from tests.models.harness import (
    check_layout,
    generate,
    max_frame_diff,
    max_image_diff,
    run_pipeline,
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
        ("extra", save_safetensors(random_lora(model, seed=7, targets=EXTRA_TARGETS),
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
    return args, run_layouts({"one": {}}, *args)["one"], both_switching({}, *args)


def run_layouts(layouts: dict, qwen, qwen_loras, wan, wan_loras, sharded=()) -> dict:
    """Every layout of ``layouts`` on this rank, for both families, and :func:`switching`
    on both families under each layout named in ``sharded`` (one pool task)."""
    out = {
        name: (generate(layout, qwen, [QWEN_REQUEST], None, qwen_loras),
               wan_generate(layout, wan, [WAN_REQUEST], wan_loras))
        for name, layout in layouts.items()
    }  # fmt: skip
    args = (qwen, qwen_loras, wan, wan_loras)
    out |= {name: both_switching(SHARDED[name], *args) for name in sharded}
    if "tp2" in sharded:  # the split adapters follow the experts on and off the device
        out["tp2 expert_offload"] = wan_offloaded(SHARDED["tp2"], wan, wan_loras)
    return out


def wan_offloaded(layout: dict, path: str, loras: tuple) -> tuple:
    """:data:`WAN_REQUEST` under ``layout`` with the idle expert on the host
    (``expert_offload``; adapters unfused there): ``(frames, latents, swaps)``."""
    from ithaca.models.wan.pipeline import WanPipeline

    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = WanPipeline(path, state, torch.float32, expert_offload=True)
        for name, file, scale in loras:
            pipe.load_lora(name, file, scale)
        pipe.fuse_loras = True  # refused with expert offload (asserted: ran unfused)
        frames, latents, _, _ = run_pipeline(pipe, [WAN_REQUEST])
        assert not pipe.loras.fused
        for runtime in pipe.runtimes:
            runtime.remove()
        return frames, latents, len(pipe.placement.swaps)


EXTRA_TARGETS = ("proj_out", "to_k", "img_mod.1")
"""The diffusers-format Qwen-Image adapter's layers: at TP 2 ``img_mod.1`` is split by rows
and gathered, ``to_k`` split by heads, ``proj_out`` replicated."""
SHARDED = {"tp2": dict(tensor_parallel_size=2), "hsdp2": dict(ulysses_degree=2, use_hsdp=True)}
SWITCHES = {  # family: (request, ((label, adapters, fuse_loras), ...))
    "Qwen-Image": (QWEN_REQUEST, (
        ("base", (), False),
        ("stack", QWEN_REQUEST["lora"], False),
        ("stack fused", QWEN_REQUEST["lora"], True),
        ("extra fused", (LoraRef("extra", 1.0),), True),
        ("none", (), True),
    )),
    "Wan2.2": (WAN_REQUEST, (  # both experts run every loop (2 steps: 999 | 500)
        ("base", (), False),
        ("both + high", WAN_REQUEST["lora"], False),
        ("both + high fused", WAN_REQUEST["lora"], True),
        ("low fused", (LoraRef("v", 0.8, "low_noise"),), True),
        ("none", (), True),
    )),
}  # fmt: skip


def both_switching(layout: dict, qwen, qwen_loras, wan, wan_loras) -> dict:
    return {"Qwen-Image": switching(layout, qwen, qwen_loras, *SWITCHES["Qwen-Image"]),
            "Wan2.2": switching(layout, wan, wan_loras, *SWITCHES["Wan2.2"])}  # fmt: skip


def switching(layout: dict, path: str, loras: tuple, request: dict, switches: tuple) -> tuple:
    """The ``switches`` in turn on one pipeline under ``layout``: ``(steps, fused,
    restored, adapter numel, experts)`` - per step the pixels (images or frames) and
    final latents (the returning rank; elsewhere empty) and whether the set ran fused;
    whether every base weight this rank holds (every expert) is bit-identical at the end;
    this rank's adapter size; per step the experts the forwards ran (Wan2.2)."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        for name, file, scale in loras:
            pipe.load_lora(name, file, scale)
        captured, decode, ran = {}, pipe.decode, []

        def keep(job, latents):
            captured["latents"] = latents.float().cpu()
            return decode(job, latents)

        pipe.decode = keep
        if hasattr(pipe, "placement"):  # Wan2.2: which expert each forward ran
            activate = pipe.placement.activate
            pipe.placement.activate = lambda i: (ran.append(i), activate(i))[1]
        models = list(pipe.lora_targets().values())
        before = _base_weights(models)
        steps, fused, experts = [], [], []
        for _, refs, fuse in switches:
            pipe.fuse_loras = fuse
            [result] = pipe.generate([GenerationParams(**dict(request, lora=refs))])
            fused.append(bool(pipe.loras.fused))
            experts.append(sorted(set(ran)))
            ran.clear()
            pixels = result.frames
            if result.images:
                pixels = np.stack([np.asarray(im) for im in result.images])
            steps.append((pixels, captured.pop("latents", None)))
        after = _base_weights(models)
        restored = before.keys() == after.keys() and all(
            torch.equal(before[k], after[k]) for k in before
        )
        adapter = sum(
            _local(p).numel() for m in models for n, p in m.named_parameters() if ".lora_" in n
        )
        for runtime in getattr(pipe, "runtimes", None) or [pipe.runtime]:
            runtime.remove()
        return steps, fused, restored, adapter, experts


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _base_weights(models: list) -> dict:
    return {(i, n): _local(p).detach().clone() for i, m in enumerate(models)
            for n, p in m.named_parameters() if ".lora_" not in n}  # fmt: skip


def _check_switching(name: str, family: str, per_rank: list, one: tuple) -> None:
    steps, fused = per_rank[0][:2]
    switches = SWITCHES[family][1]
    expect_fused = [bool(refs) and (fuse or name.startswith("hsdp")) for _, refs, fuse in switches]
    assert fused == expect_fused, (name, family, fused)  # HSDP fuses every set
    assert all(r[2] for r in per_rank), f"{name} {family}: base weights changed"
    assert all(0 < r[3] < one[3] for r in per_rank), (name, family, [r[3] for r in per_rank])
    assert all(r[4] == one[4] for r in per_rank), (name, family, [r[4] for r in per_rank])
    for (label, _, _), (pixels, latents), (ref_pixels, ref_latents) in zip(
        switches, steps, one[0], strict=True
    ):
        err = (latents - ref_latents).abs().max().item()
        assert err <= 1e-4, f"{name} {family} {label}: latents differ from 1 rank by {err:.2e}"
        diff = max_frame_diff(pixels, ref_pixels)
        assert diff <= 1, f"{name} {family} {label}: {diff}/255"
        print(f"{family} {name} {label}: latents {err:.1e}, pixels {diff}/255")
    assert torch.equal(steps[-1][1], steps[0][1]) and np.array_equal(steps[-1][0], steps[0][0])


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
    args, one, one_switching = cases
    world = 4 if layouts is HYBRID else 2
    sharded = list(SHARDED) if world == 2 else []  # TP 2 and HSDP 2 ride on the 2-rank task
    results = worker_pool(world).run(run_layouts, layouts, *args, sharded, timeout=1200)
    for name, layout in layouts.items():
        _check([rank[name] for rank in results], one, layout)
    if sharded:
        frames, latents, _ = results[0]["tp2 expert_offload"]
        err = (latents - one[1][1]).abs().max().item()
        assert err <= 1e-4, f"Wan tp2 expert_offload: latents differ from 1 rank by {err:.2e}"
        assert max_frame_diff(frames[0], one[1][0][0]) <= 1
        assert all(r["tp2 expert_offload"][2] > 0 for r in results)  # the experts moved
        print(f"Wan2.2 tp2 expert_offload: latents {err:.1e}, "
              f"frames {max_frame_diff(frames[0], one[1][0][0])}/255")  # fmt: skip
    for name in sharded:
        for family, one_family in one_switching.items():
            per_rank = [rank[name][family] for rank in results]
            _check_switching(name, family, per_rank, one_family)


def test_the_adapters_change_the_outputs(cases):
    (qwen, _, wan, _), one, switches = cases
    for family, (steps, fused, restored, _, experts) in switches.items():
        assert fused == [False, False, True, True, False] and restored, family
        assert max_frame_diff(steps[1][0], steps[0][0]) > 8, family  # the set changes pixels
        assert max_frame_diff(steps[3][0], steps[2][0]) > 8, family
        assert max_frame_diff(steps[2][0], steps[1][0]) <= 1, family  # fused ~ unfused
        assert np.array_equal(steps[4][0], steps[0][0]) and torch.equal(steps[4][1], steps[0][1])
        assert experts == ([[0, 1]] * 5 if family == "Wan2.2" else [[]] * 5), (family, experts)
    base_qwen = generate({}, qwen, [dict(QWEN_REQUEST, lora=())])
    assert max_image_diff(one[0][0][0], base_qwen[0][0]) > 8
    base_wan = wan_generate({}, wan, [dict(WAN_REQUEST, lora=())], ())
    assert max_frame_diff(one[1][0][0], base_wan[0][0]) > 8
