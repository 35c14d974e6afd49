"""A toy joint-attention transformer for plan tests: single-device math only.

Patch embed -> joint RoPE over [text, image] positions (a (cos, sin) tuple) ->
blocks with joint text/image attention and a per-token modulation computed inline ->
norm -> ``outputs["main"]``. Attention goes through ``block.attn`` (a callable with
the ``ParallelAttention`` signature), which a test swaps for a runtime's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ithaca.parallel import (
    ParallelAttention,
    ParallelState,
    SequenceParallelInput,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
)

C, HEADS, HEAD_DIM, IN = 32, 4, 8, 6


def rotate(x, cos, sin):
    """RoPE on the last dim; ``cos, sin`` ``(L, D)`` broadcast over (B, L, H, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


class JointRope(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer(
            "inv_freq", 1.0 / (100.0 ** (torch.arange(HEAD_DIM // 2) / (HEAD_DIM // 2)))
        )

    def forward(self, txt_ids: torch.Tensor, img_ids: torch.Tensor):
        pos = torch.cat([txt_ids, img_ids]).float()  # (T + S,)
        freqs = pos[:, None] * self.inv_freq[None]  # (T + S, D/2)
        freqs = torch.cat([freqs, freqs], dim=-1)  # (T + S, D)
        return freqs.cos(), freqs.sin()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.txt_qkv = nn.Linear(C, 3 * C)
        self.out = nn.Linear(C, C)
        self.txt_out = nn.Linear(C, C)
        self.attn = ParallelAttention(ParallelState.single())

    def forward(self, hidden_states, encoder_hidden_states, rope, modulation, text_mask=None):
        b, s, _ = hidden_states.shape
        t = encoder_hidden_states.shape[1]
        cos, sin = rope  # (T + S, D) each
        x = hidden_states * (1 + modulation)
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, HEAD_DIM).unbind(2)
        tq, tk, tv = self.txt_qkv(encoder_hidden_states).view(b, t, 3, HEADS, HEAD_DIM).unbind(2)
        q, k = rotate(q, cos[t:], sin[t:]), rotate(k, cos[t:], sin[t:])
        tq, tk = rotate(tq, cos[:t], sin[:t]), rotate(tk, cos[:t], sin[:t])
        img, txt = self.attn(q, k, v, joint_q=tq, joint_k=tk, joint_v=tv, joint_mask=text_mask)
        hidden_states = hidden_states + self.out(img.reshape(b, s, C))
        encoder_hidden_states = encoder_hidden_states + self.txt_out(txt.reshape(b, t, C))
        return encoder_hidden_states, hidden_states


class ToyTransformer(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.patch_embed = nn.Linear(IN, C)
        self.txt_embed = nn.Linear(IN, C)
        self.rope = JointRope()
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(C)
        self.outputs = nn.ModuleDict({"main": nn.Linear(C, IN)})

    def forward(self, hidden_states, encoder_hidden_states, timestep, text_mask=None):
        b, s, _ = hidden_states.shape
        t = encoder_hidden_states.shape[1]
        x = self.patch_embed(hidden_states)
        txt = self.txt_embed(encoder_hidden_states)
        rope = self.rope(torch.arange(t), torch.arange(s) + 100)
        # Per-token modulation computed inline at full length: blocks.* shards it.
        pos = torch.linspace(0, 1, s)[None, :, None]
        modulation = torch.tanh(timestep[:, None, None] * pos) * 0.1  # (B, S, 1)
        modulation = modulation.expand(b, s, C)
        for block in self.blocks:
            txt, x = block(x, txt, rope, modulation, text_mask)
        return self.outputs["main"](self.norm(x))


def _rope_spec(auto_pad: bool) -> SequenceParallelPartialInput:
    return SequenceParallelPartialInput(
        split_dim=0,
        text_len_source="txt_ids",
        expected_dims=2,
        split_output=True,
        auto_pad=auto_pad,
    )


# Shard at the patch embedding's output; the RoPE image part follows its padding.
PLAN_EMBED = {
    "patch_embed": {0: SequenceParallelInput(1, expected_dims=3, split_output=True, auto_pad=True)},
    "rope": {0: _rope_spec(False), 1: _rope_spec(False)},
    "blocks.*": {"modulation": SequenceParallelInput(1, expected_dims=3, auto_pad=True)},
    "outputs.main": SequenceParallelOutput(gather_dim=1, expected_dims=3),
}

# Shard at the first block's input (the seeds' pattern); RoPE pads on its own.
PLAN_BLOCK = {
    "rope": {0: _rope_spec(True), 1: _rope_spec(True)},
    "blocks.0": {"hidden_states": SequenceParallelInput(1, expected_dims=3, auto_pad=True)},
    "blocks.*": {"modulation": SequenceParallelInput(1, expected_dims=3, auto_pad=True)},
    "outputs.main": SequenceParallelOutput(gather_dim=1, expected_dims=3),
}

PLANS = {"embed": PLAN_EMBED, "block": PLAN_BLOCK}


class TokenMixer(nn.Module):
    """Self-attention over tokens only, sharded at the root's input and output."""

    _sp_plan = {  # noqa: RUF012 - plans are class-level data by design
        "": {
            "hidden_states": SequenceParallelInput(1, expected_dims=3, auto_pad=True),
            0: SequenceParallelOutput(gather_dim=1, expected_dims=3),
        }
    }

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(IN, 3 * C)
        self.out = nn.Linear(C, IN)
        self.attn = ParallelAttention(ParallelState.single())

    def forward(self, hidden_states):
        b, s, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, s, 3, HEADS, HEAD_DIM).unbind(2)
        img, _ = self.attn(q, k, v)
        return self.out(img.reshape(b, s, C))


def make_model(seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer().eval()


def make_inputs(image_len: int, text_len: int = 5, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, image_len, IN, generator=g)
    txt = torch.randn(batch, text_len, IN, generator=g)
    timestep = torch.rand(batch, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, -2:] = False  # a padded prompt
    return x, txt, timestep, mask
