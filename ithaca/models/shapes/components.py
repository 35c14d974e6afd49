"""The parts of the shapes model, in exactly Qwen-Image's classes, and how they are saved.

A ``QwenImagePipeline`` directory like ``Qwen/Qwen-Image``'s, only tiny:

- tokenizer: a byte-level BPE ``Qwen2Tokenizer`` trained on the T2I chat template and
  on scene prompts, so every scene word is one token and the template's system prefix
  has the real tokenizer's count (34, the pipelines' drop index). Any text still
  tokenises (byte fallback);
- text encoder: ``Qwen2_5_VLForConditionalGeneration``, 2 layers of width 64 (its
  vision tower is a stub: t2i never calls it);
- VAE: ``AutoencoderKLQwenImage`` with 3 spatial down-samplings (``vae_scale_factor``
  8: 128x128 pixels -> 16x16x16 latents -> 64 tokens of 2x2 patches);
- transformer: ``QwenImageTransformer2DModel``, width 128 (4 heads of 32);
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's published settings
  (dynamic exponential shift, terminal sigma 0.02).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ithaca.models.qwen_image.templates import SPECIAL_TOKENS, T2I
from ithaca.models.shapes.vocabulary import known_words

TEXT_HIDDEN = 64
Z_DIM = 16
DIT_LAYERS = 4
DIT_HEADS = 4
DIT_HEAD_DIM = 32

COMPONENTS = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
    "tokenizer": ("transformers", "Qwen2Tokenizer"),
    "transformer": ("diffusers", "QwenImageTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKLQwenImage"),
}


def build_tokenizer(prompts: list[str], vocab_size: int = 1024):
    """A ``Qwen2Tokenizer`` whose scene words (from ``prompts``, a sample of the training
    prompts) and template pre-tokens are single tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Qwen2's own normaliser and pre-tokeniser, so training splits text as use will.
    reference = Qwen2Tokenizer()._tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = reference.normalizer
    bpe.pre_tokenizer = reference.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [T2I.format("")] * 200 + list(prompts)  # template pre-tokens: single tokens
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = {k: v for k, v in model["vocab"].items() if k not in SPECIAL_TOKENS}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    n = len(tok(T2I.prefix)["input_ids"])
    if n != T2I.drop:
        raise RuntimeError(f"template prefix has {n} tokens here, {T2I.drop} in Qwen2.5-VL")
    return tok


def build_text_encoder(tok, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],  # half the head dim (16)
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(config)


def build_vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return AutoencoderKLQwenImage(
            base_dim=16,
            z_dim=Z_DIM,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, False, False],
            latents_mean=[0.0] * Z_DIM,  # set from data after the VAE is trained
            latents_std=[1.0] * Z_DIM,
        )


def build_transformer(seed: int):
    from diffusers import QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * Z_DIM,
            out_channels=Z_DIM,
            num_layers=DIT_LAYERS,
            attention_head_dim=DIT_HEAD_DIM,
            num_attention_heads=DIT_HEADS,
            joint_attention_dim=TEXT_HIDDEN,
            axes_dims_rope=(8, 12, 12),  # sums to the head dim
        )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Qwen-Image's published scheduler settings.
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )


SERVING_DEFAULTS = {"width": 128, "height": 128, "num_inference_steps": 20}
"""What the model was trained and measured at; written to ``model_index.json`` under
``_ithaca_defaults`` (diffusers ignores keys starting with ``_``) for a loader that honours
checkpoint-declared defaults."""


def write_model_index(path: Path) -> None:
    from diffusers import __version__ as diffusers_version

    index = {"_class_name": "QwenImagePipeline", "_diffusers_version": diffusers_version}
    index["_ithaca_defaults"] = SERVING_DEFAULTS
    index["_ithaca_vocabulary"] = sorted(known_words())  # server: warns on other words
    index.update({k: list(v) for k, v in COMPONENTS.items()})
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(path, tokenizer, text_encoder, vae, transformer, dtype=torch.float16) -> Path:
    """Write a ``QwenImagePipeline`` directory; weights stored in ``dtype``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, model in (("text_encoder", text_encoder), ("vae", vae), ("transformer", transformer)):
        # A converted copy: the caller's (possibly training) model is left untouched.
        copy.deepcopy(model).to(dtype).save_pretrained(path / name, safe_serialization=True)
    tokenizer.save_pretrained(path / "tokenizer")
    build_scheduler().save_pretrained(path / "scheduler")
    write_model_index(path)
    return path
