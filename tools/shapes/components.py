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

from ithaca.models.qwen_image.templates import T2I
from ithaca.testing.parts import (
    QWEN_IMAGE_SCHEDULER,
    qwen2_5_vl,
    qwen2_bpe_tokenizer,
    save_pipeline,
    seeded,
)
from tools.shapes.vocabulary import known_words

TEXT_HIDDEN = 64
Z_DIM = 16
DIT_LAYERS = 4
DIT_HEADS = 4
DIT_HEAD_DIM = 32


def build_tokenizer(prompts: list[str], vocab_size: int = 1024):
    """A ``Qwen2Tokenizer`` whose scene words (from ``prompts``, a sample of the training
    prompts) and template pre-tokens are single tokens."""
    corpus = [T2I.format("")] * 200 + list(prompts)  # template pre-tokens: single tokens
    return qwen2_bpe_tokenizer(corpus, (T2I,), vocab_size)


def build_text_encoder(tok, seed: int):
    """Qwen2.5-VL, 2 layers of width 64 (4 heads, mrope sections: half the head dim, 16)."""
    vision = dict(depth=1, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=[0])  # fmt: skip
    return qwen2_5_vl(tok, seed, TEXT_HIDDEN, heads=4, kv_heads=2, **vision)


def build_vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    return seeded(
        seed + 1,
        AutoencoderKLQwenImage,
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

    return seeded(
        seed + 2,
        QwenImageTransformer2DModel,
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

    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)


SERVING_DEFAULTS = {"width": 128, "height": 128, "num_inference_steps": 20}
"""What the model was trained and measured at; written to ``model_index.json`` under
``_ithaca_defaults`` (diffusers ignores keys starting with ``_``) for a loader that honours
checkpoint-declared defaults."""


def save_trained(path, class_name: str, parts: dict, extra: dict, classes: dict | None = None,
                 dtype=torch.float16) -> Path:  # fmt: skip
    """Write a checkpoint directory (the default image and video models alike): ``parts``
    (modules stored in ``dtype`` as converted copies, so the caller's training models are
    left untouched; tokenizers and the scheduler as they are) and ``model_index.json``
    naming each part's class (``classes``: absent components), plus the ``extra`` keys
    (serving defaults, vocabulary)."""
    from diffusers import __version__ as diffusers_version

    parts = {
        name: copy.deepcopy(part).to(dtype) if isinstance(part, torch.nn.Module) else part
        for name, part in parts.items()
    }
    return save_pipeline(Path(path), class_name, parts, classes, extra, diffusers_version)


def _extra() -> dict:
    return {"_ithaca_defaults": SERVING_DEFAULTS, "_ithaca_vocabulary": sorted(known_words())}


def write_model_index(path: Path) -> None:
    """Refresh the serving defaults and vocabulary in ``path``'s ``model_index.json``."""
    index_path = Path(path) / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(_extra())
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(path, tokenizer, text_encoder, vae, transformer, dtype=torch.float16) -> Path:
    """Write a ``QwenImagePipeline`` directory; weights stored in ``dtype``."""
    parts = {"text_encoder": text_encoder, "vae": vae, "transformer": transformer,
             "tokenizer": tokenizer, "scheduler": build_scheduler()}  # fmt: skip
    return save_trained(path, "QwenImagePipeline", parts, _extra(), dtype=dtype)
