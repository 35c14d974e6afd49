"""CFG-parallel against serial CFG, alone and with Ulysses inside each branch.

Pyramid: guidance arithmetic in-process; a three-step Euler loop on the toy
transformer on 2 (cfg 2) and 4 (cfg 2 x ulysses 2) gloo ranks. Every rank ends with
the same latents as the serial loop (fp32, <= 1e-5) without any broadcast of latents.
"""

import pytest
import torch

from ithaca.config import ParallelConfig
from ithaca.parallel import (
    ParallelState,
    apply_guidance,
    apply_sequence_parallel,
    predict_branches,
)
from ithaca.testing.distributed import parallel_state
from tests.parallel import toy

IMAGE_LEN, STEPS = 11, 3


def denoise(state: ParallelState, model, scale: float, rescale: bool):
    """A toy flow-matching loop: the positive and negative prompts differ."""
    latents, pos_txt, _, mask = toy.make_inputs(IMAGE_LEN)
    neg_txt = torch.zeros_like(pos_txt)
    prompts = (pos_txt, neg_txt)
    for i in range(STEPS):
        t = torch.full((latents.shape[0],), 1.0 - i / STEPS)

        def predict(branch, t=t, latents=latents):
            with torch.no_grad():
                return model(latents, prompts[branch], t, mask)

        pos, neg = predict_branches(state, predict)
        latents = latents - (1.0 / STEPS) * apply_guidance(pos, neg, scale, rescale)
    return latents


def run_cfg(layout: dict, scale: float, rescale: bool):
    with parallel_state(ParallelConfig(**layout)) as state:
        model = toy.make_model()
        if state.sp.size > 1:
            runtime = apply_sequence_parallel(model, toy.PLAN_BLOCK, state)
            for block in model.blocks:
                block.attn = runtime.attention
        return denoise(state, model, scale, rescale)


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "norm_rescaled"])
@pytest.mark.parametrize(
    "world,layout",
    [(2, dict(cfg_parallel_size=2)), (4, dict(cfg_parallel_size=2, ulysses_degree=2))],
    ids=["cfg2", "cfg2_ulysses2"],
)
def test_cfg_parallel_equals_serial_cfg(worker_pool, world, layout, rescale):
    serial = denoise(ParallelState.single(), toy.make_model(), 4.0, rescale)
    results = worker_pool(world).run(run_cfg, layout, 4.0, rescale)
    for rank, latents in enumerate(results):
        err = (latents - serial).abs().max().item()
        assert err <= 1e-5, f"rank {rank}: {err:.2e}"
        assert torch.equal(latents, results[0]), "ranks disagree: the scheduler step diverged"


def test_guidance_formulas():
    pos, neg = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    plain = apply_guidance(pos, neg, 3.0)
    torch.testing.assert_close(plain, neg + 3.0 * (pos - neg))
    rescaled = apply_guidance(pos, neg, 3.0, rescale_to_positive_norm=True)
    torch.testing.assert_close(rescaled.norm(dim=-1), pos.norm(dim=-1))
    torch.testing.assert_close(
        rescaled / rescaled.norm(dim=-1, keepdim=True), plain / plain.norm(dim=-1, keepdim=True)
    )
    assert apply_guidance(pos, None, 3.0) is pos


def test_without_cfg_only_the_positive_branch_runs():
    calls = []
    _, neg = predict_branches(
        ParallelState.single(), lambda b: calls.append(b) or torch.ones(1), do_cfg=False
    )
    assert calls == [0] and neg is None
