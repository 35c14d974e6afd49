"""LoRA on Qwen-Image (a kohya/ComfyUI file) and Wan2.2 (one adapter per expert):
1 rank equals diffusers' ``load_lora_weights`` + ``set_adapters`` with the same scales
(latents within 1e-5, images and frames within 1/255). Tiny random checkpoints and
adapters built here; in-process, one rank (the layouts: ``test_lora.py``)."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

from ithaca.testing.lora import random_lora, save_safetensors, to_comfy
from ithaca.types import GenerationParams, LoraRef
from tests.models import test_qwen_image
from tests.models.harness import generate, max_image_diff


def _load(pipe, file, name, **kwargs):
    folder, weight = os.path.split(file)
    pipe.load_lora_weights(folder, weight_name=weight, adapter_name=name, **kwargs)


def test_qwen_image_comfy_file_equals_diffusers(tiny_checkpoints, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    path = tiny_checkpoints["t2i"]
    model = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer")
    comfy = to_comfy(random_lora(model, seed=6), alpha=2.0)
    assert all(k.startswith("diffusion_model.") for k in comfy)
    file = save_safetensors(comfy, tmp_path / "style.safetensors")
    request = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0, width=32,
                   height=32, num_inference_steps=2, seed=5, request_id="q")  # fmt: skip
    ours = generate({}, path, [dict(request, lora=(LoraRef("style", 0.9),))],
                    loras=(("style", file, 1.0),))  # fmt: skip
    original = test_qwen_image.reference_pipeline

    def reference_pipeline(p):
        pipe = original(p)
        _load(pipe, file, "style")
        pipe.set_adapters(["style"], [0.9])
        return pipe

    params = GenerationParams(**{k: v for k, v in request.items() if k != "request_id"})
    with mock.patch.object(test_qwen_image, "reference_pipeline", reference_pipeline):
        ref_images, ref_latents = test_qwen_image.run_reference(path, params)
    err = (ours[1][0] - ref_latents.float()).abs().max().item()
    assert err <= 1e-5, f"final latents differ from diffusers by {err:.2e}"
    assert max_image_diff(ours[0][0], list(ref_images)) <= 1
    base_images, _ = test_qwen_image.run_reference(path, params)
    assert max_image_diff(ours[0][0], list(base_images)) > 8  # the adapter does something


def test_wan_adapter_per_expert_equals_diffusers(tmp_path, tiny_wan):
    from diffusers import WanPipeline as RefWanPipeline
    from diffusers import WanTransformer3DModel

    from tests.models.harness import max_frame_diff
    from tests.models.test_wan import T2V, _reference

    path = tiny_wan["t2v_a14b"]
    model = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    targets = ("attn1.to_q", "attn1.to_k", "attn2.to_v", "ffn.net.2", "proj_out")
    high = save_safetensors(
        random_lora(model, seed=7, targets=targets), tmp_path / "hi.safetensors"
    )
    low = save_safetensors(random_lora(model, seed=8, targets=targets), tmp_path / "lo.safetensors")
    request = dict(T2V, guidance_scale_2=2.0, seed=7, request_id="w")
    lora = (LoraRef("hi", 0.8, "high_noise"), LoraRef("lo", 1.2, "low_noise"))
    from ithaca.models.registry import load_pipeline
    from ithaca.parallel import ParallelState
    from tests.models.harness import run_pipeline

    pipe = load_pipeline(path, ParallelState.single())
    pipe.load_lora("hi", high)
    pipe.load_lora("lo", low)
    frames, latents, _, results = run_pipeline(
        pipe, [{k: v for k, v in dict(request, lora=lora).items() if k != "request_id"}]
    )
    assert results[0].metadata["lora"] == [
        {"name": "hi", "scale": 0.8, "expert": "high_noise"},
        {"name": "lo", "scale": 1.2, "expert": "low_noise"},
    ]

    class Reference:
        @staticmethod
        def from_pretrained(p):
            ref = RefWanPipeline.from_pretrained(p)
            _load(ref, high, "hi")
            _load(ref, low, "lo", load_into_transformer_2=True)
            ref.transformer.set_adapters(["hi"], [0.8])
            ref.transformer_2.set_adapters(["lo"], [1.2])
            return ref

    ref_request = {k: v for k, v in request.items() if k not in ("seed", "request_id")}
    ref_latents, ref_frames = _reference(Reference, path, ref_request, 7)
    err = (latents - ref_latents.float()).abs().max().item()
    assert err <= 1e-5, f"final latents differ from diffusers by {err:.2e}"
    assert max_frame_diff(frames[0], ref_frames) <= 1
    base = run_pipeline(pipe, [{k: v for k, v in request.items() if k != "request_id"}])[0]
    assert max_frame_diff(frames[0], base[0]) > 8
    assert not np.array_equal(frames[0], base[0])


def test_wan_expert_must_name_one_of_its_experts(tmp_path, tiny_wan):
    from diffusers import WanTransformer3DModel

    from ithaca.models.registry import load_pipeline
    from ithaca.parallel import ParallelState

    path = tiny_wan["t2v_a14b"]
    model = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    file = save_safetensors(random_lora(model, targets=("attn1.to_q",)), tmp_path / "x.safetensors")
    pipe = load_pipeline(path, ParallelState.single())
    assert set(pipe.lora_targets()) == {"high_noise", "low_noise"}
    pipe.load_lora("x", file)
    bad = GenerationParams(prompt="a cat", lora=(LoraRef("x", 1.0, "middle"),))
    with pytest.raises(ValueError, match=r"expert 'middle'.*high_noise") as info:
        pipe.generate([bad])
    assert info.value.param == "lora"


def wan_generate(layout: dict, path: str, batch: list[dict], loras: tuple):
    """``harness.generate_video`` with ``loras`` ``(name, path, scale)`` loaded on every rank."""
    from ithaca.config import ParallelConfig
    from ithaca.models.registry import load_pipeline
    from ithaca.testing.distributed import parallel_state
    from tests.models.harness import run_pipeline

    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        for name, file, scale in loras:
            pipe.load_lora(name, file, scale)
        frames, latents, _, _ = run_pipeline(pipe, batch)
        moved = [list(r.gathered) for r in pipe.runtimes]
        for runtime in pipe.runtimes:
            runtime.remove()
        return frames, latents, moved


def test_wan_ulysses2_with_adapters_equals_one_rank(worker_pool, tmp_path, tiny_wan):
    from diffusers import WanTransformer3DModel

    from tests.models.harness import max_frame_diff
    from tests.models.test_wan import T2V

    path = tiny_wan["t2v_a14b"]
    model = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    targets = ("attn1.to_q", "attn2.to_v", "ffn.net.2", "proj_out")
    file = save_safetensors(random_lora(model, seed=9, targets=targets), tmp_path / "w.safetensors")
    batch = [dict(T2V, seed=3, lora=(LoraRef("w", 0.7, "low_noise"),))]
    one = wan_generate({}, path, batch, (("w", file, 1.0),))
    results = worker_pool(2).run(wan_generate, {"ulysses_degree": 2}, path, batch,
                                 (("w", file, 1.0),))  # fmt: skip
    frames, latents, gathered = results[0]
    err = (latents - one[1]).abs().max().item()
    assert err <= 1e-4, f"final latents differ from 1 rank by {err:.2e}"
    assert max_frame_diff(frames[0], one[0][0]) <= 1
    assert all(g == ["proj_out[0]"] for g in gathered), gathered  # through peft's wrapper


def test_wan_expert_offload_takes_adapters(tmp_path):
    """With the idle expert offloaded, adapters load into both experts and the video is
    the resident pipeline's bit for bit (on CPU the host copies are the weights)."""
    import torch
    from diffusers import WanTransformer3DModel

    from ithaca.models.registry import load_pipeline
    from ithaca.models.wan.pipeline import WanPipeline
    from ithaca.parallel import ParallelState
    from tests.models.harness import max_frame_diff, run_pipeline, tiny_wan_paths
    from tests.models.test_wan import T2V

    path = tiny_wan_paths(tmp_path / "wan")["t2v_a14b"]
    model = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    file = save_safetensors(random_lora(model, seed=10, targets=("attn1.to_q", "proj_out")),
                            tmp_path / "o.safetensors")  # fmt: skip
    state = ParallelState.single()
    resident = load_pipeline(path, state)
    offloaded = WanPipeline(path, state, torch.float32, expert_offload=True)
    request = dict(T2V, num_frames=1, guidance_scale=1.0, num_inference_steps=2, seed=9,
                   lora=(LoraRef("o", 0.9),))  # fmt: skip
    videos = []
    for pipe in (resident, offloaded):
        pipe.load_lora("o", file)
        videos.append(run_pipeline(pipe, [request])[0][0])
    assert offloaded.placement.offload and offloaded.placement.swaps
    assert np.array_equal(videos[1], videos[0])  # offloaded == resident, bit for bit
    offloaded.fuse_loras = resident.fuse_loras = True
    assert np.array_equal(run_pipeline(offloaded, [request])[0][0], videos[0])
    assert not offloaded.loras.fused  # refused: a swap would copy in the unmerged weights
    fused = run_pipeline(resident, [request])[0][0]
    assert resident.loras.fused and max_frame_diff(fused, videos[0]) <= 1


def test_offloaded_expert_swaps_adapter_tensors_with_it(monkeypatch):
    """The flat-buffer path (pinning patched, as on a GPU): a peft adapter injected after
    placement renames the base weights; swaps still relink them (kept by identity) and
    the adapter's own tensors follow the expert."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    from ithaca.runtime import offload
    from ithaca.runtime.offload import ExpertPlacement

    monkeypatch.setattr(offload, "_register", lambda buf: None)
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)) for _ in range(2)]
    x = torch.randn(3, 8)
    placement = ExpertPlacement(experts, torch.device("cuda", 0), offload=True)
    for copy in placement.copies:  # the copy goes to the CPU here
        copy.device = torch.device("cpu")
    config = LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    for expert in experts:
        inject_adapter_in_model(config, expert, adapter_name="a")
    want = [e(x) for e in experts]
    for index in (0, 1, 0):
        assert torch.equal(placement.activate(index)(x), want[index])
    names = {n for n, _ in experts[1].named_parameters()}
    assert "0.base_layer.weight" in names and "0.lora_A.a.weight" in names
