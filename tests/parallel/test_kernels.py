"""Local attention kernels and log-sum-exp merging, in-process.

The CPU flash kernel must match plain SDPA, report lse, mark fully masked rows empty,
and merging partials over a split of the keys must equal attention over all keys.
"""

import pytest
import torch
import torch.nn.functional as F

from ithaca.parallel.kernels import local_attention, merge_partials, reference_attention


def qkv(s_q=9, s_k=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, s, 3, 8, generator=g).to(dtype) for s in (s_q, s_k, s_k)]


def sdpa(q, k, v, mask=None):
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=m
    ).transpose(1, 2)


def test_cpu_kernel_matches_sdpa_and_reference():
    q, k, v = qkv()
    mask = torch.rand(2, 11, generator=torch.Generator().manual_seed(1)) > 0.4
    out, lse = local_attention(q, k, v, mask)
    assert (out - sdpa(q, k, v, mask)).abs().max() <= 1e-6
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    assert (out - ref_out).abs().max() <= 1e-6
    assert (lse - ref_lse).abs().max() <= 1e-5
    assert lse.shape == (2, 9, 3) and lse.dtype == torch.float32


def test_fully_masked_rows_are_empty():
    q, k, v = qkv()
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1] = False
    out, lse = local_attention(q, k, v, mask)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_merging_key_blocks_equals_attention_over_all_keys(dtype, tol):
    q, k, v = qkv(dtype=dtype)
    full = sdpa(q.float(), k.float(), v.float())
    acc = None
    for lo, hi in [(0, 4), (4, 5), (5, 11)]:
        out, lse = local_attention(q, k[:, lo:hi], v[:, lo:hi])
        acc = (out.float(), lse) if acc is None else merge_partials(*acc, out, lse)
    assert (acc[0] - full).abs().max() <= tol
    _, lse_full = reference_attention(q, k, v)
    lse_tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (acc[1] - lse_full).abs().max() <= lse_tol


def test_merging_with_an_empty_partial_is_identity():
    q, k, v = qkv()
    out, lse = local_attention(q, k, v)
    empty = (torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    merged, merged_lse = merge_partials(*empty, out, lse)
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
    both_empty = merge_partials(*empty, *empty)
    assert (both_empty[0] == 0).all() and torch.isneginf(both_empty[1]).all()
