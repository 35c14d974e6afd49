"""Ulysses, Ring and hybrid attention against single-process attention.

Pyramid: kernels and merging in-process (test_kernels.py); here 2-, 4- and 8-rank gloo
numerics, every rank's gathered output compared with a float32 reference over the
unsharded joint sequence. Tolerances: fp32 max abs error <= 1e-5; bf16 (fp32 merge)
<= 2e-2.
"""

from dataclasses import dataclass

import pytest
import torch

from ithaca.config import ParallelConfig
from ithaca.parallel import ParallelAttention, sp_gather, sp_shard_with_padding
from ithaca.parallel.kernels import reference_attention
from ithaca.testing.distributed import parallel_state

H, D, B = 4, 8, 2


@dataclass(frozen=True)
class Case:
    image_len: int = 16
    text_len: int = 0  # 0: no joint text
    front: bool = True
    text_mask: bool = False  # padded prompt: some text keys masked out
    image_mask: bool = False  # a key mask on image tokens, sharded with them
    dtype: str = "float32"
    seed: int = 0


def make_inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)

    def rnd(s):
        return torch.randn(B, s, H, D, generator=g).to(dtype)

    img = [rnd(case.image_len) for _ in range(3)]
    txt = [rnd(case.text_len) for _ in range(3)] if case.text_len else None
    text_mask = image_mask = None
    if case.text_mask:
        text_mask = torch.ones(B, case.text_len, dtype=torch.bool)
        text_mask[0, -3:] = False  # batch 0: a padded prompt
        text_mask[1, 1] = False
    if case.image_mask:
        image_mask = torch.rand(B, case.image_len, generator=g) > 0.3
    return img, txt, text_mask, image_mask


def reference(case: Case):
    """float32 attention over the joint sequence in the model's token order."""
    (q, k, v), txt, text_mask, image_mask = make_inputs(case)
    if txt is None:
        return reference_attention(q, k, v, image_mask)[0].float(), None
    t, s = case.text_len, case.image_len
    tm = text_mask if text_mask is not None else torch.ones(B, t, dtype=torch.bool)
    im = image_mask if image_mask is not None else torch.ones(B, s, dtype=torch.bool)
    order = (lambda a, b: [a, b]) if case.front else (lambda a, b: [b, a])
    qq, kk, vv = (torch.cat(order(x, y), dim=1) for x, y in zip(txt, (q, k, v), strict=True))
    out = reference_attention(qq, kk, vv, torch.cat(order(tm, im), dim=1))[0].float()
    return (out[:, t:], out[:, :t]) if case.front else (out[:, :s], out[:, s:])


class _Padding:
    def __init__(self, padded: int, valid: int):
        self.padded, self.valid = padded, valid

    def valid_length(self, global_len):
        return self.valid if global_len == self.padded else None


def run_attention(layout: dict, case: Case):
    """On every rank: shard, attend in parallel, gather; returns (image_out, text_out)."""
    with parallel_state(ParallelConfig(**layout)) as state:
        (q, k, v), txt, text_mask, image_mask = make_inputs(case)
        shards = [sp_shard_with_padding(x, 1, state) for x in (q, k, v)]
        pad = shards[0][1]
        padding = _Padding(case.image_len + pad, case.image_len) if pad else None
        local_mask = None
        if image_mask is not None:
            local_mask = sp_shard_with_padding(image_mask, 1, state)[0]
        attn = ParallelAttention(state, padding=padding)
        joint = {}
        if txt is not None:
            joint = dict(
                joint_q=txt[0], joint_k=txt[1], joint_v=txt[2], joint_mask=text_mask,
                joint_strategy="front" if case.front else "rear",
            )  # fmt: skip
        out, text_out = attn(*(s for s, _ in shards), key_mask=local_mask, **joint)
        full = sp_gather(out, 1, state)[:, : case.image_len]
        return (
            full.float(),
            None if text_out is None else text_out.float(),
            dict(state.stats.bytes_sent),
        )


def check(results, case: Case, tol: float):
    ref_img, ref_txt = reference(case)
    for rank, (img, txt, _) in enumerate(results):
        err = (img - ref_img).abs().max().item()
        assert err <= tol, f"rank {rank}: image output differs by {err:.2e} > {tol:.0e}"
        if ref_txt is not None:
            err = (txt - ref_txt).abs().max().item()
            assert err <= tol, f"rank {rank}: text output differs by {err:.2e} > {tol:.0e}"


LAYOUTS_2 = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2)}
LAYOUTS_4 = {
    "ulysses4": dict(ulysses_degree=4),
    "ring4": dict(ring_degree=4),
    "hybrid2x2": dict(ulysses_degree=2, ring_degree=2),
}
CASES = {
    "image_only": Case(),
    "joint_front": Case(text_len=7, front=True),
    "joint_rear": Case(text_len=7, front=False),
    "text_mask": Case(text_len=9, text_mask=True),
    "image_mask": Case(text_len=5, image_mask=True),
    "unpadded_len": Case(image_len=13, text_len=6, text_mask=True),  # 13 % P != 0
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("layout", LAYOUTS_2.values(), ids=LAYOUTS_2.keys())
def test_two_ranks_fp32(worker_pool, layout, case):
    check(worker_pool(2).run(run_attention, layout, case), case, 1e-5)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("layout", LAYOUTS_4.values(), ids=LAYOUTS_4.keys())
def test_four_ranks_fp32(worker_pool, layout, case):
    check(worker_pool(4).run(run_attention, layout, case), case, 1e-5)


@pytest.mark.parametrize("layout", LAYOUTS_4.values(), ids=LAYOUTS_4.keys())
def test_four_ranks_bf16(worker_pool, layout):
    case = Case(image_len=32, text_len=7, text_mask=True, dtype="bfloat16")
    check(worker_pool(4).run(run_attention, layout, case), case, 2e-2)


def test_ring_sees_a_fully_padded_block(worker_pool):
    # 5 tokens over 4 ring ranks pad to 8: the last rank's block is all padding.
    case = Case(image_len=5, text_len=3)
    check(worker_pool(4).run(run_attention, dict(ring_degree=4), case), case, 1e-5)


def test_text_outputs_identical_on_every_rank(worker_pool):
    case = Case(image_len=12, text_len=7, text_mask=True)
    results = worker_pool(4).run(run_attention, dict(ulysses_degree=2, ring_degree=2), case)
    for img, txt, _ in results[1:]:
        assert torch.equal(txt, results[0][1])
        assert torch.equal(img, results[0][0])


def test_bytes_sent_match_theory(worker_pool):
    # fp32 image-only attention, S tokens, d = H*D per token, P ranks.
    s, p, elem = 16, 2, 4
    d = H * D
    case = Case(image_len=s)
    ulysses = worker_pool(p).run(run_attention, dict(ulysses_degree=p), case)
    ring = worker_pool(p).run(run_attention, dict(ring_degree=p), case)
    # Ulysses: q, k, v out and the output back: 4 * (B*S*d/P) * (P-1)/P elements.
    for _, _, sent in ulysses:
        assert sent["all_to_all"] == 4 * B * s * d // p * (p - 1) // p * elem
    # Ring: K and V of every other rank's block pass once: 2 * B*S*d * (P-1)/P elements.
    for _, _, sent in ring:
        assert sent["p2p"] == 2 * B * s * d * (p - 1) // p * elem


@pytest.mark.slow
@pytest.mark.serial  # 8 ranks on 2 cores: alone, not beside an xdist worker
def test_eight_ranks_hybrid_with_cfg_axis(worker_pool):
    # cfg x ulysses x ring = 2 x 2 x 2: attention runs within each cfg half.
    case = Case(image_len=13, text_len=7, text_mask=True)
    layout = dict(cfg_parallel_size=2, ulysses_degree=2, ring_degree=2)
    check(worker_pool(8).run(run_attention, layout, case), case, 1e-5)
