"""Bagel's network: the two-expert Qwen2 decoder (MoT), SigLIP + connector, embeddings.

Written from the published architecture (ByteDance-Seed/BAGEL-7B-MoT) on transformers'
Qwen2 / SigLIP building blocks and diffusers' timestep sinusoid. Parameter and buffer
names are the official checkpoint's key names: :mod:`ithaca.models.bagel.loader` reads
every key into the tensor of the same name.

Shapes: one sequence at a time, ``(1, S, D)`` hidden states (batch 1, as the official
inferencer). A segment's rows are routed per expert: ``gen`` is the slice of VAE-latent
rows (``*_moe_gen`` weights); every other row (text, ViT tokens, the vision start / end
markers) takes the understanding weights. Both kinds share one attention.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import Timesteps
from torch import nn
from transformers import Qwen2Config, SiglipVisionConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, apply_rotary_pos_emb
from transformers.models.siglip.modeling_siglip import SiglipEncoder


def routed(x: torch.Tensor, und: nn.Module, gen: nn.Module, rows: slice | None) -> torch.Tensor:
    """``und`` on every row of ``x`` (1, S, ...) except ``rows``, which take ``gen``."""
    if rows is None:
        return und(x)
    return torch.cat([und(x[:, : rows.start]), gen(x[:, rows]), und(x[:, rows.stop :])], dim=1)


@dataclass
class Segment:
    """What every decoder layer needs to run one segment (prefill or query block)."""

    cos: torch.Tensor
    sin: torch.Tensor
    """RoPE tables of the segment's positions, (1, S, head_dim)."""
    gen: slice | None
    """The VAE-latent rows (generation expert), or None."""
    causal: bool
    """Text prefill: causal, aligned bottom-right to the cache; image blocks: full."""
    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer ``(k, v)`` of the context, (1, KV, L, head_dim), keys rotated."""
    store: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """If a list (prefill): each layer appends ``past`` with this segment's ``(k, v)``."""


class MoTAttention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        d = config.hidden_size
        self.head_dim = hd = d // self.heads
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, self.heads * hd))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, self.kv_heads * hd))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, self.kv_heads * hd))
            setattr(self, f"o_proj{suffix}", nn.Linear(self.heads * hd, d, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(hd, eps=config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(hd, eps=config.rms_norm_eps))

    def _heads(self, x, proj, norm, seg, n):
        """Projected, per-head RMS-normed rows: (1, S, D) -> (1, n, S, head_dim)."""
        y = routed(x, getattr(self, proj), getattr(self, f"{proj}_moe_gen"), seg.gen)
        y = y.view(1, x.shape[1], n, self.head_dim)  # (1, S, n*hd) -> (1, S, n, hd)
        if norm is not None:
            y = routed(y, getattr(self, norm), getattr(self, f"{norm}_moe_gen"), seg.gen)
        return y.transpose(1, 2)

    def forward(self, x: torch.Tensor, seg: Segment, layer: int) -> torch.Tensor:
        s = x.shape[1]
        q = self._heads(x, "q_proj", "q_norm", seg, self.heads)
        k = self._heads(x, "k_proj", "k_norm", seg, self.kv_heads)
        v = self._heads(x, "v_proj", None, seg, self.kv_heads)
        q, k = apply_rotary_pos_emb(q, k, seg.cos, seg.sin)  # RoPE after q/k norm
        if seg.past is not None:  # (1, KV, L, hd) ++ (1, KV, S, hd)
            k = torch.cat([seg.past[layer][0], k], dim=2)
            v = torch.cat([seg.past[layer][1], v], dim=2)
        if seg.store is not None:
            seg.store.append((k, v))
        mask = None  # causal: query i sees keys j <= L + i (the cache's L = total - s)
        if seg.causal:
            mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - s)
        # GQA without copying the cache: query head h reads KV head h // (heads / kv_heads)
        out = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(1, s, self.heads * self.head_dim)
        return routed(out, self.o_proj, self.o_proj_moe_gen, seg.gen)


class MoTDecoderLayer(nn.Module):
    """Pre-norm Qwen2 layer with two experts; ``forward(hidden_states, segment)`` returns
    the hidden states only, the shape a step cache wraps (``ithaca.cache``)."""

    def __init__(self, config: Qwen2Config, index: int):
        super().__init__()
        self.index = index
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = MoTAttention(config)
        self.mlp, self.mlp_moe_gen = Qwen2MLP(config), Qwen2MLP(config)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, Qwen2RMSNorm(d, eps=eps))
            setattr(self, f"{name}_moe_gen", Qwen2RMSNorm(d, eps=eps))

    def forward(self, hidden_states: torch.Tensor, segment: Segment) -> torch.Tensor:
        gen = segment.gen
        h = routed(hidden_states, self.input_layernorm, self.input_layernorm_moe_gen, gen)
        h = hidden_states + self.self_attn(h, segment, self.index)
        m = routed(h, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, gen)
        return h + routed(m, self.mlp, self.mlp_moe_gen, gen)


class MoTModel(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(
            MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Qwen2RMSNorm(d, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(d, eps=config.rms_norm_eps)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Qwen2's rotate-half tables for ``positions`` (S,): cos, sin (1, S, head_dim)."""
        hd = self.config.hidden_size // self.config.num_attention_heads
        exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=positions.device) / hd
        inv_freq = 1.0 / (self.config.rope_parameters["rope_theta"] ** exponent.float())
        freqs = positions.float()[:, None] * inv_freq[None, :]  # (S, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[None]  # (1, S, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, hidden_states: torch.Tensor, segment: Segment) -> torch.Tensor:
        """Final-norm output of the segment's rows, (1, S, D)."""
        for layer in self.layers:
            hidden_states = layer(hidden_states, segment)
        return routed(hidden_states, self.norm, self.norm_moe_gen, segment.gen)


def _table(rows: int, dim: int) -> nn.Module:
    """A ``pos_embed`` buffer (rows, dim) in a container (the checkpoint's key name)."""
    module = nn.Module()
    module.register_buffer("pos_embed", torch.zeros(rows, dim))
    return module


@dataclass(frozen=True)
class BagelConfig:
    """The values the official loader hard-codes (the checkpoint has no Bagel config)."""

    latent_patch_size: int = 2
    """VAE latents enter as p x p patches: one token per 16 x 16 pixels."""
    max_latent_size: int = 64
    """Latent token grid side of ``latent_pos_embed`` (64: up to 1024 px a side)."""
    vit_max_num_patch_per_side: int = 70
    """ViT patch grid side of the SigLIP and ``vit_pos_embed`` tables (980 px)."""
    timestep_embed_frequency_dim: int = 256
    """Sinusoid size fed to the time embedder's MLP."""
    latent_channels: int = 16
    """FLUX autoencoder latent channels."""


BAGEL_TP_PLAN = {
    **{
        f"language_model.model.layers.*.{module}": style
        for expert in ("", "_moe_gen")  # both experts of every layer, split alike
        for module, style in (
            (f"self_attn.q_proj{expert}", "colwise"),  # heads [r*H/P, (r+1)*H/P)
            (f"self_attn.k_proj{expert}", "colwise"),  # KV heads [r*KV/P, ...): GQA local
            (f"self_attn.v_proj{expert}", "colwise"),
            (f"self_attn.o_proj{expert}", "rowwise"),
            (f"mlp{expert}.gate_proj", "colwise"),
            (f"mlp{expert}.up_proj", "colwise"),
            (f"mlp{expert}.down_proj", "rowwise"),
        )
    },
    **{
        f"vit_model.vision_model.encoder.layers.*.{module}": style
        for module, style in (
            ("self_attn.q_proj", "colwise"),
            ("self_attn.k_proj", "colwise"),
            ("self_attn.v_proj", "colwise"),
            ("self_attn.out_proj", "rowwise"),
            ("mlp.fc1", "colwise"),
            ("mlp.fc2", "rowwise"),
        )
    },
}
"""Tensor parallel (:mod:`ithaca.parallel.tensor`, diffusers' ``_tp_plan`` format):
the decoder's attention (q/k/v by heads, the GQA's KV heads included; o_proj rowwise)
and SwiGLU MLP of both experts, and the SigLIP layers. The per-head q/k RMSNorms stay
whole; the norms over the hidden size, the embedders, the connector and ``llm2vae``
are replicated: every tp rank holds the same full hidden states between layers."""


class Bagel(nn.Module):
    """The whole network; the VAE and tokenizer live beside it (``loader``)."""

    _hsdp_units = (
        "language_model.model.layers",  # each layer: both experts' weights
        "language_model.model.embed_tokens",
        "language_model.model.norm",
        "language_model.model.norm_moe_gen",
        "time_embedder.mlp",
        "vae2llm",
        "llm2vae",
        "vit_model.vision_model.embeddings.patch_embedding",
        "vit_model.vision_model.embeddings.position_embedding",
        "vit_model.vision_model.encoder.layers",
        "vit_model.vision_model.post_layernorm",
        "connector",
    )
    """HSDP's sharding units (:func:`ithaca.parallel.hsdp.declared_units`): what the
    sampling code calls directly. There is no root forward: prefill, query block,
    embedders and ViT are called one by one, so each is a unit of its own."""

    _tp_plan = BAGEL_TP_PLAN
    _tp_local_sizes = (
        "language_model.model.layers.*.self_attn.kv_heads",  # ``heads`` is divided already
        "vit_model.vision_model.encoder.layers.*.self_attn.num_heads",  # for the degrees
    )

    def __init__(self, llm: Qwen2Config, vit: SiglipVisionConfig, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        self.vit_patch_size = vit.patch_size
        d = llm.hidden_size
        self.language_model = nn.ModuleDict(dict(model=MoTModel(llm)))  # the checkpoint's key names
        t_dim = cfg.timestep_embed_frequency_dim  # Linear-SiLU-Linear over the sinusoid
        self.sinusoid = Timesteps(t_dim, flip_sin_to_cos=True, downscale_freq_shift=0)  # DiT's
        mlp = nn.Sequential(nn.Linear(t_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_embedder = nn.ModuleDict(dict(mlp=mlp))
        patch = cfg.latent_patch_size**2 * cfg.latent_channels
        self.vae2llm, self.llm2vae = nn.Linear(patch, d), nn.Linear(d, patch)
        self.latent_pos_embed = _table(cfg.max_latent_size**2, d)
        vit_positions = cfg.vit_max_num_patch_per_side**2
        p = vit.patch_size
        embeddings = dict(  # the checkpoint stores the patch conv as a Linear (row, col, RGB)
            patch_embedding=nn.Linear(p * p * vit.num_channels, vit.hidden_size),
            position_embedding=nn.Embedding(vit_positions, vit.hidden_size),
        )
        post = nn.LayerNorm(vit.hidden_size, eps=vit.layer_norm_eps)
        vision = dict(
            embeddings=nn.ModuleDict(embeddings), encoder=SiglipEncoder(vit), post_layernorm=post
        )
        self.vit_model = nn.ModuleDict(dict(vision_model=nn.ModuleDict(vision)))
        self.connector = nn.Sequential(  # fc1 -> gelu(tanh) -> fc2
            OrderedDict(fc1=nn.Linear(vit.hidden_size, d), act=nn.GELU("tanh"), fc2=nn.Linear(d, d))
        )
        self.vit_pos_embed = _table(vit_positions, d)

    @property
    def llm(self) -> MoTModel:
        return self.language_model.model

    def t_emb(self, t: torch.Tensor) -> torch.Tensor:
        """Raw t in [0, 1] -> (1, D): DiT sinusoid, cos first, then Linear-SiLU-Linear."""
        freq = self.sinusoid(t.reshape(1)).to(self.vae2llm.weight.dtype)
        return self.time_embedder.mlp(freq)

    def embed_latents(self, x: torch.Tensor, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Latent tokens (N, p*p*C) at time t -> decoder rows (N, D)."""
        x = x.to(self.vae2llm.weight.dtype)
        return self.vae2llm(x) + self.t_emb(t) + self.latent_pos_embed.pos_embed[pos]

    def vit_hidden(self, patches: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """SigLIP over one image's patch rows (n, p*p*3) -> post-layernorm output (n, Dv)."""
        vm = self.vit_model.vision_model
        x = vm.embeddings.patch_embedding(patches.to(self.vae2llm.weight.dtype))
        x = (x + vm.embeddings.position_embedding(pos))[None]
        return vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state)[0]

    def embed_vit(self, patches: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.connector(self.vit_hidden(patches, pos)) + self.vit_pos_embed.pos_embed[pos]

    def run(
        self,
        rows: torch.Tensor,
        positions: torch.Tensor,
        gen: slice | None,
        causal: bool,
        past=None,
        store=None,
    ) -> torch.Tensor:
        """The decoder over one segment's ``rows`` (S, D): final-norm output (S, D)."""
        cos, sin = self.llm.rope(positions, rows.dtype)
        segment = Segment(cos, sin, gen, causal, past, store)
        return self.llm(rows[None], segment)[0]
