"""Wan2.2 expert offload: one flat host buffer per expert, weights unchanged by swaps.

Pyramid: in-process on CPU (pinning is patched: only CUDA can page-lock memory; the
pinned path runs in test_wan.py's GPU-marked test and scripts/gpu-check). On a CPU
"device" nothing is copied (the host copies are the tensors), so outputs stay
bit-identical; test_wan.py checks whole videos that way.
"""

import torch
import torch.nn as nn

from ithaca.runtime import offload
from ithaca.runtime.offload import ExpertPlacement, parameter_bytes


def make_expert(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # Sizes as a transformer block has them (no 64-byte multiples among the biases).
    return nn.Sequential(
        nn.Linear(384, 1100), nn.LayerNorm(1100), nn.GELU(), nn.Linear(1100, 384)
    ).to(torch.bfloat16)


def test_each_expert_is_pinned_as_one_buffer_of_its_parameter_bytes(monkeypatch):
    pinned = []  # buffers handed to cudaHostRegister (patched: a CPU cannot pin)
    monkeypatch.setattr(offload, "_register", pinned.append)
    experts = [make_expert(0), make_expert(1)]
    before = [{n: p.detach().clone() for n, p in e.state_dict().items()} for e in experts]
    placement = ExpertPlacement(experts, torch.device("cuda", 0), offload=True)

    assert len(pinned) == 2  # one pinned buffer per expert, nothing else pinned
    for flat, expert in zip(pinned, experts, strict=True):
        weights = parameter_bytes(expert)
        assert weights <= flat.numel() <= 1.01 * weights, (flat.numel(), weights)
    assert sum(c.nbytes for c in placement.copies) == sum(flat.numel() for flat in pinned)
    for expert, flat, want in zip(experts, pinned, before, strict=True):
        lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel()
        for name, tensor in expert.state_dict().items():
            assert lo <= tensor.data_ptr() < hi  # a view into the flat buffer
            assert torch.equal(tensor, want[name])
    # Activation copies the flat buffer once and re-views it (to the CPU here: same buffer).
    for copy in placement.copies:
        copy.device = torch.device("cpu")
    placement.activate(1)
    for name, tensor in experts[1].state_dict().items():
        assert torch.equal(tensor, before[1][name])
    assert placement.swaps == [(None, 1)]


def test_swapping_experts_on_cpu_keeps_outputs_bit_identical():
    experts = [make_expert(0), make_expert(1)]
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = [e(x) for e in experts]
    placement = ExpertPlacement(experts, torch.device("cpu"), offload=True)
    for index in (0, 1, 0, 1):
        assert torch.equal(placement.activate(index)(x), want[index])
    assert placement.swaps == [(None, 0), (0, 1), (1, 0), (0, 1)]
