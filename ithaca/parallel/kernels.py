"""Single-device attention that returns the log-sum-exp, and the merge of partials.

Layout everywhere: ``q, k, v`` are ``(B, S, H, D)`` (what a diffusers attention
processor holds before it transposes), outputs ``(B, S, H, D)`` in the input dtype
and log-sum-exp ``(B, S, H)`` in float32. A key mask is ``(B, S_k)`` bool, True for
keys that may be attended.

Backends:
- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (fp32 / bf16, returns lse);
- CUDA: flash-attn's ``flash_attn_func`` when installed and no mask is needed, else
  ``aten._scaled_dot_product_efficient_attention`` with ``compute_log_sumexp``;
- anything else: an explicit fp32 implementation (also the reference in tests).
"""

from __future__ import annotations

import math

import torch

try:  # optional CUDA kernel
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - not installed on CPU machines
    _flash_attn_func = None


def _additive_bias(key_mask: torch.Tensor, dtype: torch.dtype, align: int = 1) -> torch.Tensor:
    """``(B, S_k)`` bool -> ``(B, 1, 1, S_k)`` additive bias (0 keep, -inf drop).

    ``align`` pads the storage of the last dim (some CUDA kernels need 16-aligned
    strides) and returns a view of the first ``S_k`` columns.
    """
    b, s_k = key_mask.shape
    padded = -(-s_k // align) * align
    bias = torch.zeros(b, 1, 1, padded, dtype=dtype, device=key_mask.device)
    bias[..., :s_k].masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return bias[..., :s_k]


def reference_attention(q, k, v, key_mask=None, scale=None):
    """Plain float32 attention with log-sum-exp (any device; tests' reference)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # (B, S, H, D) -> (B, H, S, D)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * scale  # (B, H, S_q, S_k)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S_q)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = (probs @ vf).transpose(1, 2)  # (B, S_q, H, D)
    return out.to(q.dtype), lse.transpose(1, 2).contiguous()


def local_attention(q, k, v, key_mask=None, scale=None):
    """Attention of ``q`` over ``k, v`` on one device: ``(out, lse)``.

    Rows whose keys are all masked get ``out = 0`` and ``lse = -inf``, so that they
    contribute nothing when merged with other partials.
    """
    if q.device.type == "cpu":
        # (B, S, H, D) -> (B, H, S, D) views; the kernel returns lse (B, H, S_q) in fp32
        bias = None if key_mask is None else _additive_bias(key_mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            0.0, False, attn_mask=bias, scale=scale,
        )  # fmt: skip
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    elif q.device.type == "cuda":
        out, lse = _cuda_attention(q, k, v, key_mask, scale)
    else:
        return reference_attention(q, k, v, key_mask, scale)
    if key_mask is not None:
        # The kernels report lse = 0 for fully masked rows; mark them empty instead.
        empty = ~key_mask.any(dim=-1)  # (B,)
        lse = lse.masked_fill(empty[:, None, None], float("-inf"))
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse.float()


def _cuda_attention(q, k, v, key_mask, scale):  # pragma: no cover - needs a GPU
    if (
        _flash_attn_func is not None
        and key_mask is None
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        # flash-attn takes (B, S, H, D) directly; lse comes back as (B, H, S_q)
        out, lse, _ = _flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
        return out, lse.transpose(1, 2)
    bias = None
    if key_mask is not None:
        b, s_q, h = q.shape[0], q.shape[1], q.shape[2]
        bias = _additive_bias(key_mask, q.dtype, align=16).expand(b, h, s_q, key_mask.shape[1])
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        bias, True, 0.0, False, scale=scale,
    )  # fmt: skip
    # lse is (B, H, S_q rounded up to the kernel's block); keep the real rows
    return out.transpose(1, 2), lse[:, :, : q.shape[1]].transpose(1, 2)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Combine two attention partials over disjoint key sets (log-sum-exp merge).

    ``out_*`` ``(B, S, H, D)``, ``lse_*`` ``(B, S, H)``; computed in the dtype of
    ``out_a`` (float32 when the caller accumulates in float32). Rows empty in both
    partials (lse = -inf) stay empty.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w_a = torch.exp(lse_a - m)
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    denom = torch.where(total == 0, torch.ones_like(total), total)
    # the weights in out_a's dtype, so a bf16 accumulator (convert_to_fp32=False) stays bf16
    dtype = out_a.dtype
    out = (
        out_a * (w_a / denom).to(dtype)[..., None]
        + out_b.to(dtype) * (w_b / denom).to(dtype)[..., None]
    )
    return out, m + torch.log(total)
