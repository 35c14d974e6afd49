"""Single-device attention that returns the log-sum-exp, and the merge of partials.

Layout everywhere: ``q, k, v`` are ``(B, S, H, D)`` (what a diffusers attention
processor holds before it transposes), outputs ``(B, S, H, D)`` in the input dtype
and log-sum-exp ``(B, S, H)`` in float32. A key mask is ``(B, S_k)`` bool, True for
keys that may be attended.

Kernels (:func:`select_kernel` decides, a pure function of the request and of what is
installed, so it is tested on CPU with the probes patched):

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (fp32 / bf16, returns lse);
- CUDA, ``auto``: only Ring needs the log-sum-exp (``need_lse``); local and Ulysses
  calls do not. Without a mask: flash-attn 3 on Hopper, flash-attn 2 on Ampere or
  newer, else torch's own kernels (``F.scaled_dot_product_attention`` when no lse is
  needed, its flash kernel when it is); with a mask: SDPA with a boolean mask, or the
  memory-efficient kernel when the lse is needed. SageAttention quantises Q/K/V and is
  never picked by ``auto`` (outputs move away from the diffusers oracle); ask for it.
- an explicit backend that cannot serve a call (not installed, pre-Ampere GPU, a mask,
  a log-sum-exp it does not return, fp32) falls back to ``auto``'s choice with one
  warning per reason, never an error;
- anything else: an explicit fp32 implementation (also the reference in tests).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _import(module: str, attr: str):
    """``module.attr`` or None when the optional package is missing or broken."""
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return None


def flash_attn_versions() -> tuple[int, ...]:
    """Installed flash-attn major versions: 2 (``flash_attn``), 3 (``flash_attn_interface``)."""
    found = [(2, "flash_attn"), (3, "flash_attn_interface")]
    return tuple(v for v, module in found if _import(module, "flash_attn_func") is not None)


def sage_available() -> bool:
    return _import("sageattention", "sageattn") is not None


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _flash_for(cap: tuple[int, int]) -> tuple[int | None, str | None]:
    """(flash-attn major version usable on a GPU of capability ``cap``, or None; why not).

    flash-attn 3 runs on Hopper (9.x) only, flash-attn 2 on Ampere or newer (>= 8.0);
    with both installed, an Ampere GPU uses 2.
    """
    installed = flash_attn_versions()
    fa2, fa3 = 2 in installed, 3 in installed
    if fa3 and cap[0] == 9:
        return 3, None
    if fa2 and cap >= (8, 0):
        return 2, None
    if not (fa2 or fa3):
        return None, "flash-attn is not installed"
    need = "9.x" if fa3 and not fa2 else ">= 8.0"
    return None, f"flash-attn needs compute capability {need}, this GPU is {cap[0]}.{cap[1]}"


_warned: set[tuple[str, str]] = set()


def _fallback(backend: str, reason: str, to: str) -> str:
    if (backend, reason) not in _warned:
        _warned.add((backend, reason))
        log.warning("attention backend %r cannot serve a call (%s); using %r", backend, reason, to)
    return to


def select_kernel(
    backend: str, device: torch.device, dtype: torch.dtype, *, need_lse: bool, masked: bool
) -> str:
    """The kernel one attention call runs: ``cpu``, ``reference``, ``sdpa``,
    ``torch_flash``, ``efficient``, ``cudnn``, ``flash2``, ``flash3`` or ``sage``."""
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        return "reference"
    cap = cuda_capability(device)
    half = dtype in HALF
    fa, flash_ok = _flash_for(cap)
    if masked:
        flash_ok = "a key mask"
    elif not half:
        flash_ok = f"dtype {dtype}"

    if flash_ok is None:
        auto = f"flash{fa}"
    elif masked:
        auto = "efficient" if need_lse else "sdpa"
    elif need_lse:
        auto = "torch_flash" if half and cap >= (8, 0) else "efficient"
    else:
        auto = "sdpa"
    if backend == "auto":
        return auto
    if backend == "flash":
        return f"flash{fa}" if flash_ok is None else _fallback(backend, flash_ok, auto)
    if backend == "efficient":
        return "efficient"
    if backend == "sdpa":
        return "sdpa" if not need_lse else _fallback(backend, "Ring needs the lse", auto)
    if backend == "cudnn":
        if not half or cap < (8, 0) or masked:
            return _fallback(backend, "needs fp16/bf16, no mask and capability >= 8.0", auto)
        return "cudnn"
    if backend == "sage":
        if not sage_available():
            return _fallback(backend, "sageattention is not installed", auto)
        if need_lse or masked or not half or cap < (8, 0):
            return _fallback(
                backend, "needs fp16/bf16, no mask, no lse (not Ring), capability >= 8.0", auto
            )
        return "sage"
    raise ValueError(f"attention_backend ({backend!r}) is not a known backend")


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


def local_attention(q, k, v, key_mask=None, scale=None, *, backend="auto", need_lse=True):
    """Attention of ``q`` over ``k, v`` on one device: ``(out, lse)``.

    Rows whose keys are all masked get ``out = 0`` and ``lse = -inf``, so that they
    contribute nothing when merged with other partials. With ``need_lse=False`` the
    lse may be None (the CUDA kernels that skip it are faster).
    """
    kernel = select_kernel(
        backend, q.device, q.dtype, need_lse=need_lse, masked=key_mask is not None
    )
    if kernel == "cpu":
        # (B, S, H, D) -> (B, H, S, D) views; the kernel returns lse (B, H, S_q) in fp32
        bias = None if key_mask is None else _additive_bias(key_mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            0.0, False, attn_mask=bias, scale=scale,
        )  # fmt: skip
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    elif kernel == "reference":
        return reference_attention(q, k, v, key_mask, scale)
    else:
        out, lse = _cuda_attention(kernel, q, k, v, key_mask, scale, need_lse)
    if key_mask is not None:
        # The kernels report lse = 0 for fully masked rows; mark them empty instead.
        empty = ~key_mask.any(dim=-1)  # (B,)
        out = out.masked_fill(empty[:, None, None, None], 0.0)
        if lse is not None:
            lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    return out, None if lse is None else lse.float()


def _cuda_attention(kernel, q, k, v, key_mask, scale, need_lse):  # pragma: no cover - GPU
    """Run ``kernel`` (see :func:`select_kernel`); lse ``(B, S_q, H)`` or None."""
    s_q = q.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    if kernel in ("flash2", "flash3"):
        module = "flash_attn" if kernel == "flash2" else "flash_attn_interface"
        fn = _import(module, "flash_attn_func")
        if kernel == "flash2":  # (B, S, H, D) in; lse (B, H, S_q)
            if not need_lse:
                return fn(q, k, v, softmax_scale=scale), None
            out, lse, _ = fn(q, k, v, softmax_scale=scale, return_attn_probs=True)
        else:  # flash-attn 3 returns (out, lse) in its releases so far
            res = fn(q, k, v, softmax_scale=scale)
            out, lse = res if isinstance(res, tuple) else (res, None)
            if lse is None:
                return out, None
            lse = lse[..., :s_q] if lse.dim() == 3 else lse
        return out, lse.transpose(1, 2)
    if kernel == "sage":
        fn = _import("sageattention", "sageattn")
        return fn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale), None
    if kernel == "sdpa":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        return out.transpose(1, 2), None
    if kernel == "torch_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, scale=scale)[:2]
    elif kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, need_lse, scale=scale
        )[:2]
    else:  # efficient
        bias = None
        if key_mask is not None:
            b, h = q.shape[0], q.shape[2]
            bias = _additive_bias(key_mask, q.dtype, align=16).expand(b, h, s_q, key_mask.shape[1])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, bias, need_lse, 0.0, False, scale=scale
        )[:2]
    if not need_lse:
        return out.transpose(1, 2), None
    # lse is (B, H, S_q [rounded up to a block], [1]); keep the real rows
    lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[:, :, :s_q]
    return out.transpose(1, 2), lse.transpose(1, 2)


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
