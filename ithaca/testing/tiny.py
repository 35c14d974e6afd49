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

import torch

from ithaca.models.qwen_image.templates import (
    EDIT,
    EDIT_PLUS,
    SPECIAL_TOKENS,
    T2I,
    PromptTemplate,
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
    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    # Use Qwen2's own normaliser and pre-tokeniser so training splits words as it will.
    template = Qwen2Tokenizer()._tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = template.normalizer
    bpe.pre_tokenizer = template.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_byte_alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = {k: v for k, v in model["vocab"].items() if k not in SPECIAL_TOKENS}
    # Special tokens after the BPE vocabulary, as in the real tokenizer.
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    for template in (T2I, EDIT, EDIT_PLUS):
        _check_prefix(tok, template)
    return tok


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def _check_prefix(tok, template: PromptTemplate) -> None:
    n = len(tok(template.prefix)["input_ids"])
    if n != template.drop:
        raise RuntimeError(
            f"tiny tokenizer gives the template prefix {n} tokens, the real one {template.drop}"
        )


def _build_text_encoder(tok, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


def _build_transformer(seed: int, layered: bool = False):
    from diffusers import QwenImageTransformer2DModel

    # Qwen-Image-Layered's flags; the other kinds keep the defaults (same config bytes).
    flags = dict(use_layer3d_rope=True, use_additional_t_cond=True) if layered else {}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),
            **flags,
        )
    return model.eval()


def _build_vae(seed: int, input_channels: int = 3):
    from diffusers import AutoencoderKLQwenImage

    # Qwen-Image-Layered's VAE encodes and decodes RGBA (input_channels=4).
    channels = {"input_channels": input_channels} if input_channels != 3 else {}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        model = AutoencoderKLQwenImage(
            base_dim=4,
            z_dim=16,
            dim_mult=[1, 1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True, False],
            **channels,
        )
        # A random decoder's output is dominated by its biases (a near-constant grey
        # whatever the latents). Without biases, and with a wider output layer, the image
        # follows the latents: std ~0.3 in [-1, 1], so uint8 comparisons mean something.
        with torch.no_grad():
            for module in (model.decoder, model.post_quant_conv):
                for name, param in module.named_parameters():
                    if name.endswith("bias"):
                        param.zero_()
            model.decoder.conv_out.weight.mul_(2.0)
    return model.eval()


def _build_scheduler():
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


def build_image_processor():
    from transformers import Qwen2VLImageProcessor

    # Few vision tokens: at most 112x112 pixels reach the vision tower (16 tokens).
    return Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2
    )


def _save_processor(tok, path: Path) -> None:
    """The ``processor`` folder of a Qwen2VLProcessor: image processor + tokenizer.

    Written part by part: constructing ``Qwen2VLProcessor`` needs its video processor,
    which needs torchvision (not installed on CPU machines here).
    """
    build_image_processor().save_pretrained(path)
    tok.save_pretrained(path)
    config = {"processor_class": "Qwen2VLProcessor"}
    (path / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tiny_qwen_image(path: str | os.PathLike, kind: str = "t2i", seed: int = 0) -> Path:
    """Write a tiny Qwen-Image checkpoint of ``kind`` to ``path``; return the path."""
    if kind not in PIPELINE_CLASSES:
        raise ValueError(f"kind ({kind!r}) must be one of {sorted(PIPELINE_CLASSES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    components = {
        "transformer": ("diffusers", "QwenImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLQwenImage"),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
        "tokenizer": ("transformers", "Qwen2Tokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    layered = kind == "layered"
    _build_transformer(seed, layered).save_pretrained(path / "transformer")
    _build_vae(seed, 4 if layered else 3).save_pretrained(path / "vae")
    _build_text_encoder(tok, seed).save_pretrained(path / "text_encoder")
    tok.save_pretrained(path / "tokenizer")
    _build_scheduler().save_pretrained(path / "scheduler")
    if kind != "t2i":
        _save_processor(tok, path / "processor")
        components["processor"] = ("transformers", "Qwen2VLProcessor")
    index = {"_class_name": PIPELINE_CLASSES[kind], "_diffusers_version": "0.42.1"}
    index.update({k: list(v) for k, v in sorted(components.items())})
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


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
