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

from ithaca.testing.parts import (
    WAN_SCHEDULER,
    save_pipeline,
    seeded,
    sharpen_decoder,
    umt5_encoder,
    wan_transformer,
)

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
    model = seeded(
        seed,
        AutoencoderKLWan,
        temperal_downsample=[False, True, True],
        latents_mean=mean,
        latents_std=std,
        **layout,
    )
    # As in the tiny Qwen-Image VAE: frames that follow the latents, not a constant grey.
    sharpen_decoder(model.decoder, model.post_quant_conv)
    return model


def _build_transformer(seed: int, in_channels: int, out_channels: int, heads: int = 2):
    model = wan_transformer(seed, heads, 16, (in_channels, out_channels), text_dim=TEXT_DIM,
                            freq_dim=32, ffn_dim=64, num_layers=2)  # fmt: skip
    # A random init leaves the modulation tables near zero and the output projection
    # tiny; scale them so that the experts and the conditioning visibly matter.
    with torch.no_grad():
        model.proj_out.weight.mul_(8.0)
    return model


def build_tiny_wan(
    path: str | os.PathLike, kind: str = "t2v_a14b", seed: int = 0, heads: int = 2
) -> Path:
    """Write a tiny Wan2.2 checkpoint of ``kind`` to ``path``; return the path. ``heads``
    of 16 channels each (4: room for tensor parallel 2 x Ulysses 2)."""
    from diffusers import UniPCMultistepScheduler

    if kind not in KINDS:
        raise ValueError(f"kind ({kind!r}) must be one of {sorted(KINDS)}")
    class_name, two_experts, boundary_ratio, expand_timesteps = KINDS[kind]
    tok = train_tokenizer()
    vae = _build_vae(seed + 3, kind == "ti2v_5b")
    z = vae.config.z_dim
    channels = (2 * z + 4 if kind == "i2v_a14b" else z, z)
    parts = {
        "transformer": _build_transformer(seed + 1, *channels, heads),
        "vae": vae,
        "text_encoder": umt5_encoder(len(tok), seed, TEXT_DIM, d_kv=8, buckets=8, distance=32),
        "tokenizer": tok,
        "scheduler": UniPCMultistepScheduler(**WAN_SCHEDULER),
    }
    classes = {"transformer_2": (None, None)}
    if two_experts:
        parts["transformer_2"] = _build_transformer(seed + 2, *channels, heads)
        del classes["transformer_2"]
    if class_name == "WanImageToVideoPipeline":
        classes.update(image_encoder=(None, None), image_processor=(None, None))
    extra = {"boundary_ratio": boundary_ratio, "expand_timesteps": expand_timesteps}
    return save_pipeline(Path(path), class_name, parts, classes, extra)
