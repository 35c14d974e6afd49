"""--enable-cpu-offload / --enable-layerwise-offload: where the weights are, and when.

On the CPU the "device" copy is a second host buffer, so the mechanism runs here: a
parameter's storage lies in the component's host buffer outside its use and in the
device buffer inside. The pipeline runs (tiny FLUX.1: two text encoders, two block
lists) are compared with the resident run: final latents within 1e-5, images within
1/255 (the copies move the weights to other addresses, which may change CPU rounding).
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

from ithaca.config import ParallelConfig
from ithaca.models.flux.pipeline import FluxPipeline
from ithaca.models.registry import load_pipeline
from ithaca.runtime.offload import LayerwiseOffload, Offload, Placement, parameter_bytes
from ithaca.testing.distributed import parallel_state
from ithaca.types import GenerationParams
from tools.memory_table import checkpoint_rank_parameter_bytes

REQUEST = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0,
               width=28, height=20, num_inference_steps=2, seed=5)  # fmt: skip


def _in(buffer: torch.Tensor, module: nn.Module) -> bool:
    lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    return all(lo <= p.data_ptr() < hi for p in module.parameters())


def test_offloaded_components_visit_the_device_one_at_a_time():
    torch.manual_seed(0)
    encoder, vae = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)), nn.Linear(8, 4)
    x = torch.randn(2, 8)
    want = vae(encoder(x))
    offload = Offload("cpu")
    offload.add("text_encoder", encoder)
    offload.add("vae", vae)
    enc, dec = offload.copies["text_encoder"], offload.copies["vae"]
    seen = []
    encoder[2].register_forward_hook(lambda *_: seen.append((enc.resident(), dec.resident())))
    vae.register_forward_hook(lambda *_: seen.append((enc.resident(), dec.resident())))
    assert _in(enc.flat, encoder) and _in(dec.flat, vae)  # on the host outside their use
    out = vae(encoder(x))
    assert seen == [(True, False), (False, True)]  # each alone on the device while it runs
    assert _in(dec._device_flat, vae) and not enc.resident()
    offload.evict()
    assert _in(dec.flat, vae) and (enc.loads, dec.loads) == (1, 1)
    assert torch.allclose(out, want, atol=1e-6)
    assert offload.host_bytes >= parameter_bytes([encoder, vae]) == (144 + 36) * 4


def test_layerwise_offload_keeps_at_most_the_running_and_the_next_block():
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
    x = torch.randn(3, 16)
    want = x
    for b in blocks:
        want = b(want)
    layerwise = LayerwiseOffload(list(blocks), "cpu")
    seen = []
    for b in blocks:
        b.register_forward_hook(
            lambda *_: seen.append(
                ([i for i, c in enumerate(layerwise.copies) if c.resident()], layerwise.on_device())
            )
        )
    out = x
    for b in blocks:
        out = b(out)
    # The running block in use, the next one's copy on its way, every older one dropped
    # (after the last block: the first, for the next forward).
    assert seen == [([0], [0, 1]), ([1], [1, 2]), ([2], [2, 3]), ([3], [0, 3])]
    assert torch.allclose(out, want, atol=1e-6)


def _run(layout: dict, path: str):
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        on_device = []
        pipe.text_encoder_2.register_forward_hook(
            lambda *_: (
                on_device.append(pipe.offloading.offload.copies["text_encoder_2"].resident())
                if "text_encoder_2" in pipe.offloading.offload.copies
                else None
            )
        )
        captured = []
        decode = pipe.decode
        pipe.decode = lambda job, latents: captured.append(latents.float()) or decode(job, latents)
        result = pipe.generate([GenerationParams(**REQUEST)])[0]
        after = {n: c.resident() for n, c in pipe.offloading.offload.copies.items()}
        return np.asarray(result.images[0], np.int16), captured[0], on_device, after, pipe


def test_cpu_and_layerwise_offload_give_the_resident_images(tiny_family):
    path = tiny_family(FluxPipeline)
    image, latents, _, _, plain = _run({}, path)
    assert plain.offloading.host_bytes == 0
    weights = plain.memory()["parameter_bytes"]
    # docs/memory.md's counting, from the checkpoint's config files alone: exact.
    assert weights == checkpoint_rank_parameter_bytes(path, dtype_bytes=4)["rank0"]
    for layout in ({"cpu_offload": True}, {"layerwise_offload": True, "vae_placement": "offload"}):
        got, got_latents, on_device, after, pipe = _run(layout, path)
        assert torch.allclose(got_latents, latents, atol=1e-5), layout
        assert np.abs(got - image).max() <= 1, layout
        assert pipe.memory()["parameter_bytes"] == weights  # the same weights, elsewhere
        assert not any(after.values())  # between requests: everything offloaded on the host
        if layout.get("cpu_offload"):
            assert on_device == [True, True]  # positive and negative prompt: on the device
            assert set(after) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
            assert pipe.offloading.offload.copies["transformer"].loads == 1  # once per request
        else:
            assert set(after) == {"vae"}  # the text encoders stay on the device (rank0)
            assert len(pipe.offloading.layerwise[0].copies) == len(
                pipe.transformer.transformer_blocks
            ) + len(pipe.transformer.single_transformer_blocks)


def test_expert_placement_policy():
    """Wan2.2's idle expert on the host: asked for, never by default on CPU, never with
    HSDP (an error when asked), and left to --enable-cpu-offload when that is on."""
    experts = {"transformer": nn.Linear(4, 4), "transformer_2": nn.Linear(4, 4)}

    def place(offload, **config):
        return Placement(ParallelConfig(**config), "cpu").place_experts(experts, (), offload)

    assert [place(None).offload, place(True).offload, place(False).offload] == [0, 1, 0]
    assert not place(True, cpu_offload=True).offload  # the whole transformer is offloaded
    with pytest.raises(ValueError, match="expert_offload and use_hsdp exclude each other"):
        place(True, use_hsdp=True, ulysses_degree=2)
