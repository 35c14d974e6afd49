"""Exact VAE patch parallelism: one decode (or encode) split by rows across ranks.

The latent ``(B, C, [T,] H, W)`` is split along its height ``H`` into contiguous row
blocks, unevenly where ``H`` does not divide (9 rows over 2 ranks: 5 + 4), and every
rank runs the whole VAE on its block. Height, not width or time: a row block of a
row-major image is one contiguous slab per channel (the halo rows a convolution needs
are contiguous memory, sent without a copy), the gathered result is a plain
concatenation in raster order, and time cannot be split at all (the causal 3D VAEs of
Wan / Qwen-Image carry a per-frame feature cache from one chunk of frames to the next,
which stays per rank and untouched here).

Unlike tiling, the result is the single-rank decode, because every layer that mixes
rows is wrapped, by module type, for the duration of :func:`split_rows`:

- ``nn.Conv2d`` / ``nn.Conv3d`` (and the causal 3D convolutions, which pad themselves):
  the rows the kernel reaches beyond the block come from the neighbouring ranks
  (``halo``: point-to-point send/recv on the rank's device); the zero padding of the
  image edge only on the first and last rank. Strides keep each rank's outputs aligned
  because every block boundary is a multiple of the VAE's total stride (blocks are
  whole latent rows), and asymmetric pads (``ZeroPad2d``, ``Downsample2D``'s
  ``(0, 1, 0, 1)``) pad only the image edge;
- ``nn.GroupNorm``: the per-group mean, then the variance around it (two passes, for
  agreement with the one-rank statistics), all-reduced over the ranks;
- attention blocks (diffusers ``Attention``, Wan / Qwen-Image ``*AttentionBlock``):
  the rows they attend over are gathered, the block runs on the whole image (its own
  norm and convolutions unsplit) and each rank keeps its rows. They sit at the latent
  resolution only, the smallest activations of the decode.

Channel-wise norms (the RMS norms of Wan / Qwen-Image), nearest upsampling, pixel
(un)shuffles and 1x1 convolutions need nothing: they never mix rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ithaca.parallel import comm
from ithaca.parallel.state import Axis

_ATTENTION_BLOCKS = ("Attention", "WanAttentionBlock", "QwenImageAttentionBlock")
"""Class names of the VAE attention blocks (diffusers' ``Attention`` in the
``AutoencoderKL`` mid-block, the causal VAEs' single-head blocks)."""


def row_counts(rows: int, parts: int) -> list[int]:
    """``rows`` split into ``parts`` contiguous blocks, the larger ones first (9, 2 -> 5, 4)."""
    if parts > rows:
        raise ValueError(
            f"vae_patch_parallel_size ({parts}) must be at most the latent height ({rows} rows)"
        )
    return [rows // parts + (i < rows % parts) for i in range(parts)]


class RowSplit:
    """This rank's block of rows, at any resolution of the VAE.

    ``counts`` are the latent-unit rows of every rank; a tensor at another resolution
    has ``counts[q] * scale`` rows on rank ``q``, with ``scale`` read from this rank's
    own tensor (a decoder at x8 has 8 rows per latent row everywhere).
    """

    def __init__(self, axis: Axis, counts: list[int]):
        self.axis = axis
        self.counts = counts
        self.rank = axis.rank
        self.first = axis.rank == 0
        self.last = axis.rank == axis.size - 1
        self.suspended = 0
        """> 0 inside an attention block: the wrapped layers run as on one rank."""

    def sizes(self, rows: int) -> list[int]:
        """Rows of every rank for a tensor with ``rows`` rows on this rank."""
        return self._scaled(Fraction(rows, self.counts[self.rank]))

    def full_sizes(self, total: int) -> list[int]:
        """Rows of every rank's block of a tensor with ``total`` rows in all."""
        return self._scaled(Fraction(total, sum(self.counts)))

    def _scaled(self, scale: Fraction) -> list[int]:
        sizes = [c * scale for c in self.counts]
        assert all(s.denominator == 1 for s in sizes), (scale, self.counts)
        return [int(s) for s in sizes]

    def halo(self, x: torch.Tensor, top: int, bottom: int, pad_top: int, pad_bottom: int):
        """``x`` with ``top`` rows of the previous rank above and ``bottom`` rows of the
        next rank below; the first / last rank get ``pad_top`` / ``pad_bottom`` zero rows
        instead (the image edge). Rows are dim -2: ``(..., h, W) -> (..., top + h + bottom, W)``.
        Collective between neighbours: every rank of the axis calls it with the same
        ``top`` / ``bottom``."""
        h = x.shape[-2]
        if (not self.first and top) or (not self.last and bottom):
            # Not on the last rank of an edge-padded strided conv, which has no `top`.
            sizes = self.sizes(h)
            if (not self.first and top > sizes[self.rank - 1]) or (
                not self.last and bottom > sizes[self.rank + 1]
            ):
                raise ValueError(
                    f"a halo of {max(top, bottom)} rows exceeds a neighbour's block "
                    f"({min(sizes)} rows); lower vae_patch_parallel_size ({self.axis.size})"
                )
        axis, ops = self.axis, []
        above = below = None
        if not self.first and top:  # (..., top, W) from the previous rank's last rows
            above = x.new_empty((*x.shape[:-2], top, x.shape[-1]))
            ops.append(dist.P2POp(dist.irecv, above, axis.global_rank(self.rank - 1), axis.group))
        if not self.last and bottom:  # (..., bottom, W) from the next rank's first rows
            below = x.new_empty((*x.shape[:-2], bottom, x.shape[-1]))
            ops.append(dist.P2POp(dist.irecv, below, axis.global_rank(self.rank + 1), axis.group))
        # Sends mirror the receives: my first `bottom` rows go up, my last `top` rows down.
        if not self.first and bottom:
            send = x[..., :bottom, :].contiguous()
            ops.append(dist.P2POp(dist.isend, send, axis.global_rank(self.rank - 1), axis.group))
            axis.stats.record("p2p", send.numel() * send.element_size())
        if not self.last and top:
            send = x[..., h - top :, :].contiguous()
            ops.append(dist.P2POp(dist.isend, send, axis.global_rank(self.rank + 1), axis.group))
            axis.stats.record("p2p", send.numel() * send.element_size())
        if ops:
            comm._check_device("halo", axis, x)
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        if above is None:
            above = x.new_zeros((*x.shape[:-2], pad_top if self.first else 0, x.shape[-1]))
        if below is None:
            below = x.new_zeros((*x.shape[:-2], pad_bottom if self.last else 0, x.shape[-1]))
        return torch.cat([above, x, below], dim=-2)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in order: ``(..., h_q, W) -> (..., sum h_q, W)``. Uneven
        blocks travel padded to the largest and are cut back."""
        sizes = self.sizes(x.shape[-2])
        most = max(sizes)
        padded = F.pad(x, (0, 0, 0, most - x.shape[-2])).unsqueeze(0)
        # (1, ..., most, W) -> (P, ..., most, W); every rank reaches this all_gather once.
        parts = comm.all_gather(padded, self.axis, dim=0)
        return torch.cat([parts[q][..., : sizes[q], :] for q in range(len(sizes))], dim=-2)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's block of a full-height ``x`` (no communication)."""
        sizes = self.full_sizes(x.shape[-2])
        start = sum(sizes[: self.rank])
        return x[..., start : start + sizes[self.rank], :]


def _conv_rows(module: nn.Module) -> tuple[int, int, int, int, str]:
    """(kernel, stride, dilation, padding) of ``module`` along rows, and the padding's
    attribute: ``_padding`` for the causal 3D convolutions that pad themselves."""
    dim = -2  # rows: (kH, kW) of a Conv2d, (kT, kH, kW) of a Conv3d
    k = module.kernel_size[dim]
    s, d = module.stride[dim], module.dilation[dim]
    if isinstance(module.padding, str):
        raise ValueError(f"{type(module).__name__}: padding {module.padding!r} is not split")
    if module.padding_mode != "zeros":
        raise ValueError(f"{type(module).__name__}: padding_mode {module.padding_mode!r}")
    own = getattr(module, "_padding", None)
    if isinstance(own, tuple | list) and len(own) == 6:  # F.pad order: W, W, H, H, T, T
        assert own[2] == own[3], own
        return k, s, d, own[2], "_padding"
    return k, s, d, module.padding[dim], "padding"


@contextlib.contextmanager
def _wrap_conv(module: nn.Module, split: RowSplit, strip_bottom: int = 0) -> Iterator[None]:
    """Rows of the neighbours in, the image-edge padding only at the edges.

    ``strip_bottom``: rows of zeros the caller padded below every block (diffusers'
    ``Downsample2D``); they are the image edge on the last rank only."""
    k, s, d, p, attr = _conv_rows(module)
    saved = getattr(module, attr)
    if attr == "_padding":
        setattr(module, attr, (*saved[:2], 0, 0, *saved[4:]))
    else:
        setattr(module, attr, (*saved[:-2], 0, saved[-1]))
    top, bottom = p, max(0, (k - 1) * d + 1 - s - p)  # rows beyond the block, per side
    original = module._conv_forward

    def conv_forward(x, weight, bias):
        if split.suspended:  # as on one rank: the edge padding everywhere
            return original(F.pad(x, (0, 0, p, p)), weight, bias)
        if strip_bottom and not split.last:
            x = x[..., :-strip_bottom, :]
        n = x.shape[-2]
        # (..., n, W) -> (..., top + n + bottom, W) -> conv -> (..., n / s, W)
        y = original(split.halo(x, top, bottom, p, p), weight, bias)
        assert split.last or y.shape[-2] * s == n, (y.shape, n, s)
        return y

    module._conv_forward = conv_forward
    try:
        yield
    finally:
        del module._conv_forward
        setattr(module, attr, saved)


@contextlib.contextmanager
def _wrap_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    original = module.forward
    module.forward = lambda *a, **kw: forward(original, *a, **kw)
    try:
        yield
    finally:
        del module.forward


def _group_norm(split: RowSplit, module: nn.GroupNorm):
    def forward(original, x):
        if split.suspended:
            return original(x)
        b, c, g = x.shape[0], x.shape[1], module.num_groups
        xf = x.float().reshape(b, g, -1)  # (B, C, ..., h, W) -> (B, G, C/G * ... * h * W)
        count = torch.full((b, g), xf.shape[-1], dtype=xf.dtype, device=x.device)
        totals = comm.all_reduce(torch.stack([xf.sum(-1), count]), split.axis)  # (2, B, G)
        mean = (totals[0] / totals[1]).unsqueeze(-1)
        centred = xf - mean
        var = comm.all_reduce(centred.square().sum(-1), split.axis) / totals[1]  # (B, G)
        y = (centred * torch.rsqrt(var.unsqueeze(-1) + module.eps)).reshape(x.shape)
        if module.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * module.weight.float().reshape(shape) + module.bias.float().reshape(shape)
        return y.to(x.dtype)

    return forward


def _attention(split: RowSplit):
    def forward(original, x, *args, **kwargs):
        if split.suspended:
            return original(x, *args, **kwargs)
        full = split.gather(x)  # (..., h_q, W) -> (..., H, W): what every row attends over
        split.suspended += 1
        try:
            out = original(full, *args, **kwargs)
        finally:
            split.suspended -= 1
        return split.rows(out)

    return forward


@contextlib.contextmanager
def split_rows(vae: nn.Module, axis: Axis, counts: list[int]) -> Iterator[RowSplit]:
    """Wrap ``vae``'s row-mixing layers for a forward on this rank's block of rows
    (``counts``: every rank's latent rows); restored on exit."""
    split = RowSplit(axis, counts)
    with contextlib.ExitStack() as stack:
        for name, module in vae.named_modules():
            kind = type(module).__name__
            if kind in _ATTENTION_BLOCKS:
                stack.enter_context(_wrap_forward(module, _attention(split)))
            elif isinstance(module, nn.GroupNorm):
                stack.enter_context(_wrap_forward(module, _group_norm(split, module)))
            elif isinstance(module, nn.ZeroPad2d):
                stack.enter_context(_wrap_forward(module, _edge_pad(split, module)))
            elif isinstance(module, nn.Conv2d | nn.Conv3d):
                parent = vae.get_submodule(name.rpartition(".")[0]) if "." in name else vae
                stack.enter_context(_wrap_conv(module, split, _pre_padded(parent, module)))
        yield split


def _pre_padded(parent: nn.Module, conv: nn.Module) -> int:
    """Rows diffusers' ``Downsample2D`` (padding 0) pads below every input of ``conv``."""
    if type(parent).__name__ == "Downsample2D" and getattr(parent, "conv", None) is conv:
        return 1 if parent.use_conv and parent.padding == 0 else 0
    return 0


def _edge_pad(split: RowSplit, module: nn.ZeroPad2d):
    left, right, top, bottom = module.padding

    def forward(original, x):
        if split.suspended:
            return original(x)
        return F.pad(x, (left, right, top if split.first else 0, bottom if split.last else 0))

    return forward


def run_split(
    vae: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axis: Axis,
    unit: int = 1,
) -> torch.Tensor:  # fmt: skip
    """``fn(x)`` (a VAE decode or encode of ``vae``), exactly, with ``x``'s rows split
    over ``axis``; the whole result on every rank of the axis.

    ``unit``: rows of ``x`` per latent row (1 to decode a latent, the VAE's total
    stride to encode an image), so every block boundary survives every stride.
    Collective over ``axis``: every rank passes the same ``x``.
    """
    if axis.size == 1:
        return fn(x)
    if x.shape[-2] % unit:
        raise ValueError(f"height ({x.shape[-2]}) must be a multiple of {unit} to split")
    counts = row_counts(x.shape[-2] // unit, axis.size)
    with split_rows(vae, axis, counts) as split:
        out = fn(split.rows(x))
        return split.gather(out)


class ActivationPeak:
    """The largest activation footprint of one module call seen during a forward:
    bytes of the tensors a leaf module takes plus those it returns (forward hooks; no
    allocator involved, so the same count on CPU and GPU)."""

    def __init__(self, module: nn.Module):
        self.peak = 0
        self._handles = [
            m.register_forward_hook(self._hook)
            for m in module.modules()
            if not any(True for _ in m.children())
        ]

    def _hook(self, module, inputs, output) -> None:
        tensors = [*inputs, *(output if isinstance(output, tuple | list) else (output,))]
        size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        self.peak = max(self.peak, size)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> ActivationPeak:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def split_vae(vae: nn.Module | None, axis: Axis) -> Iterator[None]:
    """While open, ``vae.decode`` / ``vae.encode`` split by rows over ``axis`` (exactly;
    see :func:`run_split`): the one hook of the shared decode path. Every rank of
    ``axis`` must then make the same VAE calls in the same order. A no-op on one rank
    or for a VAE without diffusers' ``_decode`` / ``_encode``."""
    if vae is None or axis.size == 1 or not hasattr(vae, "_decode"):
        yield
        return
    if getattr(vae, "use_tiling", False):  # tiles of a block would trade halos between tiles
        raise ValueError(
            f"vae_patch_parallel_size ({axis.size}) splits the VAE exactly; disable VAE tiling"
        )
    from diffusers.models.autoencoders.vae import DecoderOutput

    decode, encode = vae._decode, getattr(vae, "_encode", None)
    stride = _stride(vae)

    def split_decode(z, return_dict: bool = True):
        # (B, C, [T,] h, W) latent rows -> pixel rows, gathered on every rank
        sample = run_split(vae, lambda x: decode(x, return_dict=False)[0], z, axis)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae._decode = split_decode
    if encode is not None:  # (B, 3, [T,] H, W) pixel rows -> moments, `stride` rows each
        vae._encode = lambda x: run_split(vae, encode, x, axis, unit=stride)
    try:
        yield
    finally:
        del vae._decode
        if encode is not None:
            del vae._encode


def _stride(vae: nn.Module) -> int:
    """Pixel rows per latent row: the causal VAEs say it, an AutoencoderKL halves per stage."""
    stride = getattr(vae, "spatial_compression_ratio", None)
    return stride or 2 ** (len(vae.config.block_out_channels) - 1)


def _splits_encode(vae: nn.Module | None, axis: Axis) -> bool:
    return vae is not None and axis.size > 1 and hasattr(vae, "_encode")


@contextlib.contextmanager
def lead_encodes(vae: nn.Module | None, axis: Axis) -> Iterator[None]:
    """On rank 0 of ``axis``, around the conditioning of requests (where edit and I2V
    inputs are encoded): each ``vae.encode`` is announced to the other ranks, which run
    :func:`follow_encodes` meanwhile, and split by rows with them. On exit (also after
    an error) the followers are released."""
    if not _splits_encode(vae, axis):
        yield
        return
    encode, unit = vae._encode, _stride(vae)

    def split_encode(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[-2]
        if rows % unit or rows // unit < axis.size:  # not whole latent rows for every rank
            return encode(x)  # decided here alone: the followers are not told
        # Every rank of the axis reaches this broadcast once per encode, in order: the
        # kind and x's shape / dtype as metadata, then x (B, C, [T,] H, W) itself from
        # this rank's device into a tensor the others create on theirs (never pickled).
        comm.broadcast_nested(("encode", x), axis)
        return run_split(vae, encode, x, axis, unit=unit)

    vae._encode = split_encode
    try:
        yield
    finally:
        del vae._encode
        comm.broadcast_nested(("done", None), axis)


def follow_encodes(vae: nn.Module | None, axis: Axis, device: torch.device) -> None:
    """On the other ranks of ``axis``: take part in the leader's encodes until it is done."""
    if not _splits_encode(vae, axis):
        return
    while True:
        kind, x = comm.broadcast_nested(None, axis)  # x: on this rank's device already
        if kind == "done":
            return
        with torch.no_grad():
            run_split(vae, vae._encode, x.to(device), axis, unit=_stride(vae))
