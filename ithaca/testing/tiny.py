"""Tiny random-weight checkpoints in the diffusers directory format, built offline.

``build_tiny_qwen_image(path, kind="t2i" | "edit" | "edit_plus" | "layered", seed=0)`` writes a
directory that ``diffusers.DiffusionPipeline.from_pretrained`` and
:func:`ithaca.models.registry.load_pipeline` both load: ``model_index.json``, a
``QwenImageTransformer2DModel``, an ``AutoencoderKLQwenImage``, a
``Qwen2_5_VLForConditionalGeneration`` text encoder, a ``Qwen2Tokenizer`` trained on the
spot with ``tokenizers`` (for edit also a ``Qwen2VLProcessor``) and a
``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's settings. ``layered``
(``QwenImageLayeredPipeline``) has the Qwen-Image-Layered architecture flags: a
transformer with the layer-axis RoPE (``use_layer3d_rope``) and the RGB/RGBA timestep
embedding (``use_additional_t_cond``), and an RGBA VAE (``input_channels=4``).

The tokenizer is trained so that every pre-token of the prompt templates is one token:
the system prefixes then have exactly the token counts of the real tokenizer (34 and
64), which the pipelines' ``drop_idx`` assumes; the builder checks this.

Weights are a function of ``seed`` (the global RNG is seeded before each model is
built and restored afterwards). Sizes: transformer 2 layers, 4 heads of 16; text
encoder 2 layers of width 32; VAE 4 down-sampling stages (``vae_scale_factor`` 16, so
the latent patch is 32 px) with 4 channels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ithaca.models.qwen_image.templates import EDIT, EDIT_PLUS, T2I
from ithaca.testing.parts import (
    QWEN_IMAGE_SCHEDULER,
    qwen2_5_vl,
    qwen2_bpe_tokenizer,
    save_pipeline,
    seeded,
    sharpen_decoder,
)

PIPELINE_CLASSES = {
    "t2i": "QwenImagePipeline",
    "edit": "QwenImageEditPipeline",
    "edit_plus": "QwenImageEditPlusPipeline",
    "layered": "QwenImageLayeredPipeline",
}
TEXT_HIDDEN = 32
_WORDS = (
    "a an the of and with on in under over near red green blue yellow black white small "
    "large cat dog bird tree house car boat mountain river sky sun moon city street photo "
    "painting drawing of style bright dark make it turn into add remove replace change "
    "background foreground person woman man child flower field beach snow rain night day "
    "Picture picture 1 2 3 4 5 6 7 8 9 0 : . , ( ) ' ! ? - a1 b2"
)


def _tokenizer_corpus() -> list[str]:
    lines = []
    for template in (T2I, EDIT, EDIT_PLUS):
        lines += [template.format("a red cat on a blue mat")] * 50
    lines += [_WORDS] * 20
    return lines


def train_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE ``Qwen2Tokenizer`` whose template pre-tokens are single tokens."""
    return qwen2_bpe_tokenizer(_tokenizer_corpus(), (T2I, EDIT, EDIT_PLUS), vocab_size)


def _build_transformer(seed: int, layered: bool = False):
    from diffusers import QwenImageTransformer2DModel

    # Qwen-Image-Layered's flags; the other kinds keep the defaults (same config bytes).
    flags = dict(use_layer3d_rope=True, use_additional_t_cond=True) if layered else {}
    return seeded(
        seed + 1,
        QwenImageTransformer2DModel,  # Qwen-Image's config but for these
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),
        **flags,
    )


def _build_vae(seed: int, input_channels: int = 3):
    from diffusers import AutoencoderKLQwenImage

    # Qwen-Image-Layered's VAE encodes and decodes RGBA (input_channels=4).
    channels = {"input_channels": input_channels} if input_channels != 3 else {}
    model = seeded(
        seed + 2,
        AutoencoderKLQwenImage,
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, False],
        **channels,
    )
    sharpen_decoder(model.decoder, model.post_quant_conv)
    return model


def build_image_processor():
    from transformers import Qwen2VLImageProcessor

    # Few vision tokens: at most 112x112 pixels reach the vision tower (16 tokens).
    return Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2
    )


def save_processor(tok, path: Path) -> None:
    """A Qwen2VLProcessor folder: image processor + tokenizer.

    Written part by part: constructing ``Qwen2VLProcessor`` needs its video processor,
    which needs torchvision (not installed on CPU machines here).
    """
    build_image_processor().save_pretrained(path)
    tok.save_pretrained(path)
    config = {"processor_class": "Qwen2VLProcessor"}
    (path / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tiny_qwen_image(path: str | os.PathLike, kind: str = "t2i", seed: int = 0) -> Path:
    """Write a tiny Qwen-Image checkpoint of ``kind`` to ``path``; return the path."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind not in PIPELINE_CLASSES:
        raise ValueError(f"kind ({kind!r}) must be one of {sorted(PIPELINE_CLASSES)}")
    path = Path(path)
    tok = train_tokenizer()
    layered = kind == "layered"
    vision = dict(depth=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=[1])  # fmt: skip
    parts = {
        "transformer": _build_transformer(seed, layered),
        "vae": _build_vae(seed, 4 if layered else 3),
        "text_encoder": qwen2_5_vl(tok, seed, TEXT_HIDDEN, **vision),
        "tokenizer": tok,
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
    }
    classes = {}
    if kind != "t2i":
        save_processor(tok, path / "processor")
        classes["processor"] = ("transformers", "Qwen2VLProcessor")
    return save_pipeline(path, PIPELINE_CLASSES[kind], parts, classes)


TINY_MODEL_VERSION = "v1"  # bump when the tiny builder changes its output


def tiny_model_path(seed: int = 0) -> str:
    """A tiny random-weight Qwen-Image checkpoint, built on first use (deterministic).

    Lives in ``$ITHACA_CACHE`` or ``~/.cache/ithaca``; built into a temporary folder and
    renamed, so concurrent first uses do not see a half-written checkpoint.
    """
    import shutil
    import tempfile

    root = Path(os.environ.get("ITHACA_CACHE", Path.home() / ".cache" / "ithaca"))
    path = root / f"tiny-qwen-image-{TINY_MODEL_VERSION}-{seed}"
    if (path / "model_index.json").is_file():
        return str(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-qwen-image-", dir=root))
    build_tiny_qwen_image(tmp, "t2i", seed=seed)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
