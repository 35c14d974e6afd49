"""The families' parallel attention processors: projections in, projection out, and
one processor for joint text+image (MMDiT) attention.

The diffusers ``Attention`` module's projections and norms are read here, in one place,
by the names diffusers gives them. :class:`JointAttnProcessor` is FLUX.1's, LongCat's,
Ovis-Image's, Qwen-Image's and SD3 / SD3.5's, their differences given as data (which
end of the joint sequence the text takes, how their RoPE comes, the mask); a family
with another attention (Z-Image, Wan2.2) subclasses :class:`ParallelProcessor` and
writes only its ``attend``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ithaca.models.rotary import apply_rope
from ithaca.parallel import SequenceParallelRuntime

IMAGE = (("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
"""The image (or only) stream's projections and QK norms."""
TEXT = (("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
"""The text stream's, in joint (MMDiT) attention."""


def project(attn, x: torch.Tensor, names=IMAGE) -> tuple[torch.Tensor, ...]:
    """``(B, L, H*D) -> q, k, v (B, L, H, D)`` through ``attn``'s projections ``names``,
    then its QK norms where the module has them."""
    projections, norms = names
    q, k, v = (getattr(attn, p)(x).unflatten(-1, (attn.heads, -1)) for p in projections)
    norm_q, norm_k = (getattr(attn, n, None) for n in norms)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


def project_out(attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, L, H, D) -> (B, L, H*D)`` in ``dtype`` through ``to_out`` (the linear, then the
    dropout where there is one)."""
    out = attn.to_out[0](out.flatten(2, 3).to(dtype).contiguous())
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class ParallelProcessor:
    """Base of the families' processors: attention runs through ``runtime``
    (:class:`ithaca.parallel.ParallelAttention` with the layout's Ulysses / Ring groups)."""

    family = "this"
    """The family's name in error messages."""
    mask_arg: str | None = None
    """The diffusers argument that carries the family's key mask (``"attention_mask"`` or
    ``"encoder_hidden_states_mask"``); any other mask given is refused."""

    def __init__(self, runtime: SequenceParallelRuntime):
        self.runtime = runtime

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb=None,
        image_rotary_emb=None,
        freqs_cis: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
    ):
        """What diffusers calls: the union of its processors' arguments, by name (its
        ``Attention`` drops keyword arguments the signature does not list). FLUX and Wan
        pass their RoPE fifth by position, the others by name; one of them is the RoPE."""
        masks = {
            "attention_mask": attention_mask,
            "encoder_hidden_states_mask": encoder_hidden_states_mask,
        }
        for name, mask in masks.items():
            if mask is not None and name != self.mask_arg:
                raise ValueError(f"{self.family} attention takes no {name}")
        rope = next((r for r in (rotary_emb, image_rotary_emb, freqs_cis) if r is not None), None)
        mask = masks.get(self.mask_arg)
        return self.attend(attn, hidden_states, encoder_hidden_states, rope, mask)

    def attend(self, attn, x: torch.Tensor, text: torch.Tensor | None, rope, mask):
        """The family's attention: image (or only) tokens ``x`` ``(B, S/P, C)``, the text
        ``(B, T, C)`` or None, the RoPE diffusers passed and the key mask (``mask_arg``)."""
        raise NotImplementedError


RopeSplit = Callable[[object, int], tuple[torch.Tensor, torch.Tensor]]
"""(the RoPE diffusers passed, text length T) -> (text, image) frequencies in the real
``(L, D/2, 2)`` form of :mod:`ithaca.models.rotary`."""


def flux_rope(rope, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1's ``(cos, sin)``, each ``(T + S/P, D)`` with every value repeated for its
    pair: the text rows, then this rank's image rows. Every second column is the pair's
    angle, so the rotation is :func:`apply_rope`'s to the bit."""
    cos, sin = rope
    freqs = torch.stack([cos[:, ::2], sin[:, ::2]], dim=-1)  # (T + S/P, D/2, 2)
    return freqs[:t], freqs[t:]


def qwen_rope(rope, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image's ``(image (S/P, D/2, 2) sharded, text (T, D/2, 2) whole)``."""
    image, text = rope
    return text, image


class JointAttnProcessor(ParallelProcessor):
    """Joint text+image attention through ``ParallelAttention``: this rank's image shard
    and the whole text, with the projections, QK norms and RoPE of diffusers' processors.

    - double-stream blocks get the text apart (``encoder_hidden_states``);
    - FLUX.1's single-stream blocks (``concat_blocks``) concatenate ``[text, image shard]``
      inside their forward: a pre-hook (:meth:`attach`) records the block's text length,
      at which the processor splits, and the output stays concatenated, unprojected;
    - an attention without text otherwise (SD3.5's ``attn2``) is image self-attention.
    """

    def __init__(
        self,
        runtime: SequenceParallelRuntime,
        family: str,
        text_first: bool = True,
        rope: RopeSplit | None = None,
        mask_arg: str | None = None,
        concat_blocks: str | None = None,
    ):
        super().__init__(runtime)
        self.family, self.mask_arg, self.rope = family, mask_arg, rope
        self.joint_strategy = "front" if text_first else "rear"  # SD3: [image, text]
        self.concat_blocks = concat_blocks
        self._text_len: int | None = None

    def attach(self, block: torch.nn.Module, name: str, blocks: str) -> None:
        """Route ``block``'s attention here; a block of ``concat_blocks`` also records its
        text length before it concatenates (blocks run one at a time, so the length is
        always the running block's)."""
        getattr(block, name).set_processor(self)
        if blocks != self.concat_blocks:
            return
        signature = inspect.signature(block.forward)

        def record(module, args, kwargs):
            text = signature.bind_partial(*args, **kwargs).arguments["encoder_hidden_states"]
            self._text_len = text.shape[1]  # (B, T, C)

        self.runtime.track(block.register_forward_pre_hook(record, with_kwargs=True))

    def attend(self, attn, x, text, rope, mask):
        q, k, v = project(attn, x)  # (B, L, H*D) -> (B, L, H, D)
        if text is not None:  # double-stream: (B, T, C) -> (B, T, H, D)
            t = text.shape[1]
            txt_q, txt_k, txt_v = project(attn, text, TEXT)
        elif self._text_len is not None:  # single-stream
            # (B, T + S/P, H, D) -> text (B, T, H, D) and image (B, S/P, H, D)
            t = self._text_len
            (txt_q, q), (txt_k, k), (txt_v, v) = (y.tensor_split([t], 1) for y in (q, k, v))
        else:  # image self-attention
            out, _ = self.runtime.attention(q, k, v)
            return project_out(attn, out, q.dtype)
        if rope is not None:
            txt_rope, img_rope = self.rope(rope, t)
            q, k = apply_rope(q, img_rope), apply_rope(k, img_rope)
            txt_q, txt_k = apply_rope(txt_q, txt_rope), apply_rope(txt_k, txt_rope)
        text_mask = None if mask is None else mask.to(torch.bool)  # (B, T), True = attend
        out, txt_out = self.runtime.attention(
            q, k, v, joint_q=txt_q, joint_k=txt_k, joint_v=txt_v,
            joint_mask=text_mask, joint_strategy=self.joint_strategy,
        )  # fmt: skip
        txt_out = txt_out.flatten(2, 3).to(q.dtype)  # (B, T, H, D) -> (B, T, H*D)
        if text is None:  # single-stream: (B, T + S/P, H*D), the block projects it
            return torch.cat([txt_out, out.flatten(2, 3).to(q.dtype)], dim=1)
        if not attn.context_pre_only:  # SD3's last block leaves its text unprojected
            txt_out = attn.to_add_out(txt_out.contiguous())
        return project_out(attn, out, q.dtype), txt_out
