"""The parts of the default video model, in exactly Wan's classes, and how they are saved.

A ``WanPipeline`` directory with one transformer (the layout of Wan2.1-T2V-1.3B, which
the Wan2.2 code path loads unchanged: no ``transformer_2``, no ``expand_timesteps``):

- tokenizer: a Unigram ``T5Tokenizer`` (what ``google/umt5-xxl`` is) trained on clip
  prompts, so every scene word is one piece;
- text encoder: ``UMT5EncoderModel``, 2 layers of width 64;
- VAE: ``AutoencoderKLWan`` in the Wan2.1 layout (z 16, 8x spatial, 4x temporal, causal),
  made from the image model's VAE (:mod:`tools.video.vae`): 64x64x17 pixels -> 16x5x8x8
  latents -> 80 tokens of 1x2x2 patches;
- transformer: ``WanTransformer3DModel``, 4 layers, 4 heads of 32 (width 128);
- scheduler: the flow-matching ``UniPCMultistepScheduler`` the Wan checkpoints ship.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

TEXT_DIM = 64
Z_DIM = 16
LAYERS = 4
HEADS = 4
HEAD_DIM = 32

COMPONENTS = {
    "scheduler": ("diffusers", "UniPCMultistepScheduler"),
    "text_encoder": ("transformers", "UMT5EncoderModel"),
    "tokenizer": ("transformers", "T5Tokenizer"),
    "transformer": ("diffusers", "WanTransformer3DModel"),
    "transformer_2": (None, None),
    "vae": ("diffusers", "AutoencoderKLWan"),
}

SERVING_DEFAULTS = {
    "width": 64,
    "height": 64,
    "num_frames": 17,
    "num_inference_steps": 20,
    "guidance_scale": 4.0,
    "fps": 8,
}
"""What the model was trained and measured at (``model_index.json`` ``_ithaca_defaults``)."""


def build_tokenizer(words: list[str]):
    """A Unigram ``T5Tokenizer`` (what ``google/umt5-xxl`` is) in which each of ``words``
    is one piece; any other text falls back to single characters."""
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's ids 0, 1, 2
    pieces = [(f"\u2581{w}", -2.0) for w in sorted(set(words))]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    pieces += [("\u2581", -4.0)] + [(c, -8.0) for c in chars]
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0)


def build_text_encoder(vocab_size: int, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=2 * TEXT_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(config)


def build_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            in_channels=Z_DIM,
            out_channels=Z_DIM,
            text_dim=TEXT_DIM,
            freq_dim=64,
            ffn_dim=4 * HEADS * HEAD_DIM,
            num_layers=LAYERS,
            cross_attn_norm=True,
            rope_max_seq_len=64,
        )


def build_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
        solver_order=2,
        final_sigmas_type="zero",
    )


def write_model_index(path: Path, vocabulary: list[str]) -> None:
    from diffusers import __version__ as diffusers_version

    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers_version,
        "_ithaca_defaults": SERVING_DEFAULTS,
        "_ithaca_vocabulary": sorted(vocabulary),
        "boundary_ratio": None,
        "expand_timesteps": False,
    }
    index.update({k: list(v) for k, v in sorted(COMPONENTS.items())})
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(
    path, tokenizer, text_encoder, vae, transformer, vocabulary, dtype=torch.float16
):
    """Write a ``WanPipeline`` directory; weights stored in ``dtype``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, model in (("text_encoder", text_encoder), ("vae", vae), ("transformer", transformer)):
        copy.deepcopy(model).to(dtype).save_pretrained(path / name, safe_serialization=True)
    tokenizer.save_pretrained(path / "tokenizer")
    build_scheduler().save_pretrained(path / "scheduler")
    write_model_index(path, vocabulary)
    return path
