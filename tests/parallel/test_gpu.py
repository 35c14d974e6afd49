"""CUDA paths of the local kernel (skipped without a GPU).

The efficient-attention path with a key mask and the flash-attn path (when installed)
must match float32 SDPA within bf16 tolerance and report a usable log-sum-exp.
"""

import pytest
import torch

from ithaca.parallel.kernels import local_attention, merge_partials, reference_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_reference(dtype, masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 4, 64, generator=g) for s in (77, 130, 130))
    mask = None
    if masked:
        mask = torch.rand(2, 130, generator=g) > 0.3
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    cuda = [t.to("cuda", dtype) for t in (q, k, v)]
    out, lse = local_attention(*cuda, None if mask is None else mask.cuda())
    assert (out.float().cpu() - ref_out).abs().max() <= 2e-2
    assert (lse.cpu() - ref_lse).abs().max() <= 2e-2
    # halves of the keys merge back to the whole
    a = local_attention(
        cuda[0], cuda[1][:, :60], cuda[2][:, :60], None if mask is None else mask[:, :60].cuda()
    )
    b = local_attention(
        cuda[0], cuda[1][:, 60:], cuda[2][:, 60:], None if mask is None else mask[:, 60:].cuda()
    )
    merged, _ = merge_partials(a[0].float(), a[1], b[0], b[1])
    assert (merged.cpu() - ref_out).abs().max() <= 2e-2


@pytest.mark.parametrize("need_lse", [False, True])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "flash", "cudnn", "efficient", "sage"])
def test_every_backend_matches_the_reference_or_falls_back(backend, need_lse):
    """Whatever kernel a backend resolves to on this GPU (it may fall back), the output
    and, for Ring calls, the log-sum-exp match float32 attention."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, s, 4, 64, generator=g) for s in (300, 300, 300))
    ref_out, ref_lse = reference_attention(q, k, v)
    cuda = [t.to("cuda", torch.bfloat16) for t in (q, k, v)]
    out, lse = local_attention(*cuda, backend=backend, need_lse=need_lse)
    tol = 6e-2 if backend == "sage" else 2e-2  # SageAttention quantises Q/K to int8
    assert (out.float().cpu() - ref_out).abs().max() <= tol
    if need_lse:
        assert lse is not None and (lse.cpu() - ref_lse).abs().max() <= 2e-2
