"""Z-Image's transformer under sequence parallelism: the ``_sp_plan`` and the processor.

The math is diffusers' ``ZImageTransformer2DModel``. Its forward builds sequences
inline (patchify, pad to 32, ``pad_sequence``, ``cat([image, caption])``), but every
sequence then enters a list of blocks whose forward takes it as an argument
``(x, attn_mask, freqs_cis, ...)``: the blocks are the module boundary the plan uses, so
no diffusers forward is copied. Plan (``auto_pad`` everywhere):

- ``noise_refiner.0`` input ``x`` ``(B, S_img, C)`` and ``noise_refiner.*`` inputs
  ``attn_mask`` ``(B, S_img)`` and ``freqs_cis`` ``(B, S_img, D/2)`` complex: the image
  tokens are sharded on dim 1 through the refiner; its last block's output is gathered
  (the forward then slices and concatenates whole sequences);
- ``context_refiner``: captions only, replicated (the processor over local attention);
- ``layers.0`` input ``x`` ``(B, S_img + S_cap, C)`` and ``layers.*`` inputs
  ``attn_mask`` / ``freqs_cis``: the unified ``[image, caption]`` sequence is sharded as
  one sequence (image and caption tokens are treated alike by these blocks: one
  self-attention, per-token norms and feed-forward);
- ``all_final_layer.<p>-<f>`` output ``(B, S_img + S_cap, C_out)``: gathered on dim 1
  (``auto_pad`` padding trimmed) before the forward's own unpatchify.

Z-Image pads every segment to a multiple of 32 tokens itself, so the sharded lengths
divide by 2, 4, 8, ...; other sizes (3, 6) are padded by ``auto_pad`` and masked.

Heads: Z-Image has 30 heads. When the Ulysses degree does not divide them, the
processor appends all-zero heads up to the next multiple (zero queries and keys give
uniform weights over zero values: the extra heads output zeros) and drops them after
the attention; 30 heads at Ulysses 4 run as 32 (7% more attention work).

Step caches (:data:`Z_IMAGE_CACHE`) cover ``layers``, the bulk of the work, whose blocks
take ``x`` (this rank's shard of the unified sequence) and return it; the two-block
refiners run on every step (their output is the stack's input, which a skipped step
adds the remembered residual to). TeaCache's indicator is the first layer's modulated
input ``attention_norm1(x) * (1 + scale_msa)`` (Z-Image's modulation has a scale and a
gate, no shift); a skipped step adds the residual of ``layers`` to every token, image
and caption alike; DBCache's ``Fn`` / middle / ``Bn`` split is over ``layers``, one
tensor. TeaCache coefficients: none are published for Z-Image. The architecturally
closest published fit, TeaCache's Lumina-Image-2.0 one (the same modulated-input form),
turns negative above a relative change of about 0.28 (a negative estimate would make
TeaCache skip more the more the input moves; few-step runs go there: the tiny checkpoint
changes by 0.42-0.48 per step at 5 steps), so the default is FLUX.1's fit (above 0.18
everywhere, increasing beyond a change of 0.05); fit Z-Image's own with ``ithaca
calibrate-teacache`` and ship it in the checkpoint's ``ithaca.json``.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from diffusers import ZImageTransformer2DModel as _DiffusersZImageTransformer

from ithaca.cache import FLUX_COEFFICIENTS, BlockCacheAdapter
from ithaca.models.attention import ParallelProcessor, project, project_out
from ithaca.models.rotary import apply_rope
from ithaca.parallel import (
    SequenceParallelInput,
    SequenceParallelOutput,
    SequenceParallelRuntime,
)
from ithaca.parallel.kernels import local_attention
from ithaca.parallel.tensor import GATHERED_COLWISE
from ithaca.runtime.parallelize import AttentionLayout


def _shard(dims: int) -> SequenceParallelInput:
    return SequenceParallelInput(split_dim=1, expected_dims=dims, auto_pad=True)


def z_image_sp_plan(config) -> dict:
    """The plan for a transformer of ``config`` (its refiner depth, its final layers)."""
    plan: dict = {}

    def add(key: str, specs: dict) -> None:
        plan.setdefault(key, {}).update(specs)

    add("noise_refiner.0", {"x": _shard(3)})
    add("noise_refiner.*", {"attn_mask": _shard(2), "freqs_cis": _shard(3)})
    last_refiner = f"noise_refiner.{config.n_refiner_layers - 1}"
    add(last_refiner, {0: SequenceParallelOutput(1, expected_dims=3)})
    add("layers.0", {"x": _shard(3)})
    add("layers.*", {"attn_mask": _shard(2), "freqs_cis": _shard(3)})
    for p, f in zip(config.all_patch_size, config.all_f_patch_size, strict=True):
        add(f"all_final_layer.{p}-{f}", {0: SequenceParallelOutput(1, expected_dims=3)})
    return plan


Z_IMAGE_TP_PLAN = {
    f"{blocks}.*.{path}": style
    for blocks in ("noise_refiner", "context_refiner", "layers")
    for path, style in {
        "attention.to_q": "colwise",
        "attention.to_k": "colwise",
        "attention.to_v": "colwise",
        "attention.to_out.0": "rowwise",
        "feed_forward.w1": "colwise",  # SwiGLU: silu(w1 x) * w3 x, then w2
        "feed_forward.w3": "colwise",
        "feed_forward.w2": "rowwise",
    }.items()
} | {f"{blocks}.*.adaLN_modulation.0": GATHERED_COLWISE for blocks in ("noise_refiner", "layers")}
"""Tensor-parallel plan (``ithaca.parallel.tensor``): heads and SwiGLU units split in
every block list; QK norms are per head, so they stay whole. The AdaLN modulation
(``256 -> 4C``; the context refiner has none) is split by rows and gathered whole."""


class ZImageTransformer2DModel(_DiffusersZImageTransformer):
    """diffusers' Z-Image transformer with its sequence- and tensor-parallel plans declared."""

    _sp_plan = staticmethod(z_image_sp_plan)  # a function of the config
    _tp_plan = Z_IMAGE_TP_PLAN


def pad_heads(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``(B, S, H, D) -> (B, S, H', D)`` with zero heads appended, ``H'`` a multiple."""
    extra = -x.shape[2] % multiple
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:2], extra, x.shape[3])], dim=2)


class ZImageParallelAttnProcessor(ParallelProcessor):
    """Z-Image self-attention over this rank's shard, through ``ParallelAttention``.

    Same projections, QK norms and RoPE as diffusers' ``ZSingleStreamAttnProcessor``; the
    RoPE in the real ``(cos, sin)`` form (:func:`ithaca.models.rotary.apply_rope`), so a
    compiled block (``--compile``) fuses it: the only complex op left is the free
    ``view_as_real`` of the frequencies.
    """

    def __init__(self, runtime: SequenceParallelRuntime, heads_multiple: int = 1):
        super().__init__(runtime)
        self.heads_multiple = heads_multiple

    family = "Z-Image"
    mask_arg = "attention_mask"

    def attend(self, attn, hidden_states, encoder_hidden_states, freqs_cis, attention_mask):
        if encoder_hidden_states is not None:
            raise ValueError("Z-Image attention is self-attention (no encoder_hidden_states)")
        q, k, v = project(attn, hidden_states)  # (B, S/P, H*D) -> (B, S/P, H, D)
        if freqs_cis is not None:  # (B, S/P, D/2) complex, sharded with the tokens
            q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"expected a (B, S) key mask, got {tuple(attention_mask.shape)}")
            key_mask = attention_mask.to(torch.bool)  # (B, S/P), True = attend
        heads = q.shape[2]
        # (B, S/P, H, D) -> (B, S/P, H', D): H' divisible by the Ulysses degree
        q, k, v = (pad_heads(t, self.heads_multiple) for t in (q, k, v))
        out, _ = self.runtime.attention(q, k, v, key_mask=key_mask)
        return project_out(attn, out[:, :, :heads], q.dtype)  # the appended heads dropped

    def attach(self, block, name: str, blocks: str) -> None:
        """The caption refiner sees whole, replicated captions: the same processor over
        plain local attention (no collective), so its RoPE is the real form too."""
        processor = self
        if blocks == "context_refiner":  # a runtime face: attention on this device only
            backend = getattr(self.runtime.attention, "backend", "auto")
            attention = functools.partial(local_attention, backend=backend, need_lse=False)
            processor = ZImageParallelAttnProcessor(SimpleNamespace(attention=attention))
        getattr(block, name).set_processor(processor)


Z_IMAGE_ATTENTION = AttentionLayout(
    processor=lambda runtime, state: ZImageParallelAttnProcessor(
        runtime, heads_multiple=state.ulysses.size
    ),
    # The caption refiner gets a local twin (``attach``): it sees whole, replicated captions.
    blocks={
        "noise_refiner": ("attention",),
        "context_refiner": ("attention",),
        "layers": ("attention",),
    },
    check_heads=False,  # the processor pads heads to a multiple of the Ulysses degree
)


def modulated_input(block: torch.nn.Module, args: dict) -> torch.Tensor:
    """``attention_norm1(x) * (1 + scale_msa)`` of a main layer (per-sample modulation)."""
    if args.get("noise_mask") is not None:
        raise ValueError("Z-Image's per-token (omni) modulation has no TeaCache indicator")
    # (B, 4*C) -> (B, 1, C): scale_msa, the first of scale/gate for attention and MLP
    scale_msa = block.adaLN_modulation(args["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
    return block.attention_norm1(args["x"]) * (1.0 + scale_msa)  # (B, S/P, C)


Z_IMAGE_CACHE = BlockCacheAdapter(
    blocks="layers",
    hidden_arg="x",
    returns="hidden",
    modulated_input=modulated_input,
    teacache_coefficients=FLUX_COEFFICIENTS,
)
