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

import torch

from ithaca.testing.parts import WAN_SCHEDULER, umt5_encoder, wan_transformer
from tools.shapes.components import save_trained

TEXT_DIM = 64
Z_DIM = 16
LAYERS = 4
HEADS = 4
HEAD_DIM = 32

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
    return umt5_encoder(vocab_size, seed, TEXT_DIM, d_kv=16, buckets=16, distance=64)


def build_transformer(seed: int):
    sizes = dict(text_dim=TEXT_DIM, freq_dim=64, ffn_dim=4 * HEADS * HEAD_DIM, num_layers=LAYERS)
    return wan_transformer(seed + 2, HEADS, HEAD_DIM, (Z_DIM, Z_DIM), **sizes)


def build_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**WAN_SCHEDULER)


def save_checkpoint(
    path, tokenizer, text_encoder, vae, transformer, vocabulary, dtype=torch.float16
):
    """Write a ``WanPipeline`` directory; weights stored in ``dtype``."""
    parts = {"text_encoder": text_encoder, "vae": vae, "transformer": transformer,
             "tokenizer": tokenizer, "scheduler": build_scheduler()}  # fmt: skip
    extra = {"_ithaca_defaults": SERVING_DEFAULTS, "_ithaca_vocabulary": sorted(vocabulary),
             "boundary_ratio": None, "expand_timesteps": False}  # fmt: skip
    return save_trained(path, "WanPipeline", parts, extra, {"transformer_2": (None, None)}, dtype)
