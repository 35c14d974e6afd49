"""The builders every tiny checkpoint is made of, once: the tiny-checkpoint recipes of
:mod:`ithaca.testing.tiny`, :mod:`ithaca.testing.tiny_families`,
:mod:`ithaca.testing.tiny_wan` and the default models' trainers (``tools/shapes``,
``tools/video``) all call these.

Weights are a function of the seed: :func:`seeded` forks the global RNG around each
model it builds. Random VAE decoders output a near-constant grey dominated by their
biases; :func:`sharpen_decoder` zeroes the biases and widens the output layer so that
the image follows the latents and uint8 comparisons mean something.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                            max_shift=0.9, num_train_timesteps=1000, shift=1.0,
                            shift_terminal=0.02, time_shift_type="exponential",
                            use_dynamic_shifting=True)  # fmt: skip
"""Qwen-Image's published ``FlowMatchEulerDiscreteScheduler`` settings."""

WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                     num_train_timesteps=1000, solver_order=2,
                     final_sigmas_type="zero")  # fmt: skip
"""The flow-matching ``UniPCMultistepScheduler`` the Wan checkpoints ship (``flow_shift``
is a request knob)."""


def seeded(seed: int, build: Callable[..., torch.nn.Module], **config) -> torch.nn.Module:
    """``build(**config)`` with the global RNG seeded to ``seed`` (and restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(**config)


def sharpen_decoder(decoder: torch.nn.Module, *extra: torch.nn.Module) -> None:
    """Zero a random decoder's (and ``extra`` modules') biases and double its output
    layer (see the module doc)."""
    with torch.no_grad():
        for module in (decoder, *extra):
            for name, param in module.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
        decoder.conv_out.weight.mul_(2.0)


def save_pipeline(
    path: Path,
    class_name: str,
    parts: dict,
    classes: dict | None = None,
    extra: dict | None = None,
    version: str = "0.42.1",
) -> Path:
    """Save every part in its subfolder and write ``model_index.json``: each part's
    ``(library, class)`` is its own type's unless ``classes`` names it (or names a
    component the checkpoint lacks: ``(None, None)``); ``extra`` adds pipeline keys."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": class_name, "_diffusers_version": version, **(extra or {})}
    for name, part in parts.items():
        part.save_pretrained(path / name)
        index[name] = [type(part).__module__.partition(".")[0], type(part).__name__]
    index.update({name: list(value) for name, value in (classes or {}).items()})
    index = dict(sorted(index.items(), key=lambda kv: (not kv[0].startswith("_"), kv[0])))
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def qwen2_bpe_tokenizer(corpus: list[str], templates: Iterable, vocab_size: int = 1024):
    """A byte-level BPE ``Qwen2Tokenizer`` trained on ``corpus``; every template's system
    prefix must come out with the real tokenizer's token count (the pipelines' drop index)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from ithaca.models.qwen_image.templates import SPECIAL_TOKENS

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
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = {k: v for k, v in model["vocab"].items() if k not in SPECIAL_TOKENS}
    # Special tokens after the BPE vocabulary, as in the real tokenizer.
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    for template in templates:
        n = len(tok(template.prefix)["input_ids"])
        if n != template.drop:
            raise RuntimeError(
                f"tiny tokenizer gives the template prefix {n} tokens, the real one {template.drop}"
            )
    return tok


def qwen2_5_vl(tok, seed: int, hidden: int, heads: int = 2, kv_heads: int = 1, **vision):
    """A 2-layer ``Qwen2_5_VLForConditionalGeneration`` of width ``hidden``; ``vision``:
    the vision tower's settings beyond its width (16) and output width (``hidden``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    special = {
        name: tok.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
              "out_hidden_size": hidden, **vision}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    return seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))


def umt5_encoder(vocab_size: int, seed: int, dim: int, d_kv: int, buckets: int, distance: int):
    """A 2-layer ``UMT5EncoderModel`` (Wan's text encoder) of width ``dim``, 4 heads."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=dim,
        d_kv=d_kv,
        d_ff=2 * dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=distance,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return seeded(seed, lambda: UMT5EncoderModel(config))


def wan_transformer(seed: int, heads: int, head_dim: int, channels: tuple[int, int], **sizes):
    """A ``WanTransformer3DModel`` with 1x2x2 patches, ``channels`` (in, out) and
    ``sizes`` (``text_dim``, ``freq_dim``, ``ffn_dim``, ``num_layers``)."""
    from diffusers import WanTransformer3DModel

    return seeded(
        seed,
        WanTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels[0],
        out_channels=channels[1],
        cross_attn_norm=True,
        rope_max_seq_len=64,
        **sizes,
    )
