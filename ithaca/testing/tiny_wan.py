"""Tiny random-weight Wan2.2 checkpoints in the diffusers directory format, built offline.

``build_tiny_wan(path, kind, seed=0)`` writes a directory that both
``diffusers.DiffusionPipeline.from_pretrained`` and
:func:`ithaca.models.registry.load_pipeline` load. Kinds mirror the three Wan2.2 releases:

- ``"t2v_a14b"``: ``WanPipeline`` with two experts (``transformer`` for high noise,
  ``transformer_2`` for low noise, different weights) and ``boundary_ratio=0.875``;
  Wan2.1 VAE layout (z 4 here, 8x spatial, 4x temporal);
- ``"i2v_a14b"``: ``WanImageToVideoPipeline``, two experts, ``boundary_ratio=0.9``, the
  transformer takes ``2 * z + 4`` channels (noise, first-frame mask, condition latents);
- ``"ti2v_5b"``: ``WanPipeline`` with ``expand_timesteps=True`` (per-token timesteps), one
  transformer, Wan2.2 VAE layout (patchified, residual, 16x spatial).

Every checkpoint has a ``UMT5EncoderModel`` text encoder (2 layers, width 32), a
``T5Tokenizer`` (Unigram) trained on the spot with ``tokenizers`` and a flow-matching
``UniPCMultistepScheduler``. Transformers: 2 layers, 2 heads of 16 (RoPE split 12/10/10).
Weights are a function of ``seed`` (the global RNG is forked around each model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

KINDS = {
    # kind: (pipeline class, two experts, boundary_ratio, expand_timesteps)
    "t2v_a14b": ("WanPipeline", True, 0.875, False),
    "i2v_a14b": ("WanImageToVideoPipeline", True, 0.9, False),
    "ti2v_5b": ("WanPipeline", False, None, True),
}
TEXT_DIM = 32
_WORDS = (
    "a an the of and with on in under over near red green blue yellow black white small "
    "large cat dog bird tree house car boat mountain river sky sun moon city street video "
    "camera slowly quickly walks runs flies turns zoom pan close up wide shot blurry low "
    "quality static bright dark , . ! ?"
)


def train_tokenizer():
    """A Unigram ``T5Tokenizer`` (what ``google/umt5-xxl`` is), trained on a few words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.normalizer = normalizers.Replace(" {2,}", " ")
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=256,
        special_tokens=["<pad>", "</s>", "<unk>"],  # T5's ids 0, 1, 2
        unk_token="<unk>",
        show_progress=False,
    )
    words = _WORDS.split()
    corpus = [_WORDS] * 20 + [" ".join(words[i : i + 5]) for i in range(len(words))] * 5
    unigram.train_from_iterator(corpus, trainer=trainer)
    vocab = [tuple(v) for v in json.loads(unigram.to_str())["model"]["vocab"]]
    # The trainer sums in parallel: scores wobble in the last digits and ties come out in
    # any order. Rounded scores and a fixed order make the ids a function of the corpus.
    specials, pieces = vocab[:3], vocab[3:]
    pieces = sorted((piece, round(score, 4)) for piece, score in pieces)
    pieces.sort(key=lambda entry: -entry[1])  # stable: ties stay in piece order
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0)


def _build_text_encoder(vocab_size: int, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    return model.eval()


def _build_transformer(seed: int, in_channels: int, out_channels: int):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=TEXT_DIM,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            rope_max_seq_len=64,
        )
        # A random init leaves the modulation tables near zero and the output projection
        # tiny; scale them so that the experts and the conditioning visibly matter.
        with torch.no_grad():
            model.proj_out.weight.mul_(8.0)
    return model.eval()


def _build_vae(seed: int, wan22: bool):
    from diffusers import AutoencoderKLWan

    z = 8 if wan22 else 4
    gen = torch.Generator().manual_seed(seed + 7)
    mean = (torch.randn(z, generator=gen) * 0.3).tolist()
    std = (torch.rand(z, generator=gen) + 0.5).tolist()
    layout = dict(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    if wan22:  # Wan2.2 VAE: 2x2 patchify in front, residual blocks, 16x spatial
        layout.update(
            is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKLWan(
            temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std, **layout
        )
        # As in the tiny Qwen-Image VAE: without decoder biases the frames follow the
        # latents instead of being a near-constant grey, so uint8 comparisons mean something.
        with torch.no_grad():
            for module in (model.decoder, model.post_quant_conv):
                for name, param in module.named_parameters():
                    if name.endswith("bias"):
                        param.zero_()
            model.decoder.conv_out.weight.mul_(2.0)
    return model.eval()


def _build_scheduler():
    from diffusers import UniPCMultistepScheduler

    # The flow-matching UniPC the Wan2.2 checkpoints ship (flow_shift is a request knob).
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
        solver_order=2,
        final_sigmas_type="zero",
    )


def build_tiny_wan(path: str | os.PathLike, kind: str = "t2v_a14b", seed: int = 0) -> Path:
    """Write a tiny Wan2.2 checkpoint of ``kind`` to ``path``; return the path."""
    if kind not in KINDS:
        raise ValueError(f"kind ({kind!r}) must be one of {sorted(KINDS)}")
    class_name, two_experts, boundary_ratio, expand_timesteps = KINDS[kind]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    wan22_vae = kind == "ti2v_5b"
    vae = _build_vae(seed + 3, wan22_vae)
    z = vae.config.z_dim
    in_channels = 2 * z + 4 if kind == "i2v_a14b" else z
    components = {
        "text_encoder": ("transformers", "UMT5EncoderModel"),
        "tokenizer": ("transformers", "T5Tokenizer"),
        "vae": ("diffusers", "AutoencoderKLWan"),
        "scheduler": ("diffusers", "UniPCMultistepScheduler"),
        "transformer": ("diffusers", "WanTransformer3DModel"),
        "transformer_2": (None, None),
    }
    _build_transformer(seed + 1, in_channels, z).save_pretrained(path / "transformer")
    if two_experts:
        _build_transformer(seed + 2, in_channels, z).save_pretrained(path / "transformer_2")
        components["transformer_2"] = ("diffusers", "WanTransformer3DModel")
    vae.save_pretrained(path / "vae")
    _build_text_encoder(len(tok), seed).save_pretrained(path / "text_encoder")
    tok.save_pretrained(path / "tokenizer")
    _build_scheduler().save_pretrained(path / "scheduler")
    if class_name == "WanImageToVideoPipeline":
        components["image_encoder"] = (None, None)
        components["image_processor"] = (None, None)
    index = {
        "_class_name": class_name,
        "_diffusers_version": "0.42.1",
        "boundary_ratio": boundary_ratio,
        "expand_timesteps": expand_timesteps,
    }
    index.update({k: list(v) for k, v in sorted(components.items())})
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
