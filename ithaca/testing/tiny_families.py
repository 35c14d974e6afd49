"""Tiny random-weight checkpoints of the other image families, built offline.

Each builder writes a directory in the diffusers format that both the diffusers
reference pipeline (``DiffusionPipeline.from_pretrained``) and
:func:`ithaca.models.registry.load_pipeline` load, with ``HF_HUB_OFFLINE=1``:

- ``build_tiny_flux(path, seed, guidance_embeds=True)``: FLUX.1 (``FluxPipeline``): a
  ``FluxTransformer2DModel`` (2 double + 2 single blocks, 4 heads of 16), a CLIP text
  encoder and CLIP BPE tokenizer, a T5 encoder and T5 unigram tokenizer, a 2-stage
  ``AutoencoderKL`` (``vae_scale_factor`` 2, so sizes are multiples of 4 px);
  ``guidance_embeds=False`` gives a FLUX.1-schnell-like checkpoint.

Tokenizers are built from a fixed word list rather than downloaded: a CLIP BPE whose
merges spell every listed word as one token (other text falls back to characters), and
a T5 unigram vocabulary of the same words plus single characters.

Weights are a function of ``seed``: the global RNG is seeded before each model is built
and restored afterwards. Random VAE decoders output a near-constant grey dominated by
their biases; the builders zero the decoder biases and widen the output layer so the
image follows the latents and uint8 comparisons mean something.
"""

from __future__ import annotations

import os
from pathlib import Path

from ithaca.testing.parts import qwen2_5_vl, save_pipeline, seeded, sharpen_decoder

WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "on",
    "in",
    "under",
    "over",
    "near",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "small",
    "large",
    "cat",
    "dog",
    "bird",
    "tree",
    "house",
    "car",
    "boat",
    "mountain",
    "river",
    "sky",
    "sun",
    "moon",
    "city",
    "street",
    "photo",
    "painting",
    "drawing",
    "style",
    "bright",
    "dark",
    "blurry",
    "ugly",
    "person",
    "woman",
    "man",
    "child",
    "flower",
    "field",
    "beach",
    "snow",
    "rain",
    "night",
    "day",
]
TEXT_HIDDEN = 32


# -- tokenizers ------------------------------------------------------------------
def clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer: byte alphabet, every word of :data:`WORDS` one token."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted(set(WORDS)):
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            current = current + piece
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """A T5 unigram tokenizer over :data:`WORDS` and single characters (no extra ids)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(WORDS))]
    vocab += [("\u2581", -2.0)]
    vocab += [
        (c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-"
    ]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


# -- encoders --------------------------------------------------------------------
def clip_text_model(tok, seed: int, with_projection: bool = False, hidden: int = TEXT_HIDDEN):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=eos,
        pad_token_id=eos,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return seeded(seed, lambda: cls(config))


def t5_encoder(tok, seed: int, hidden: int = TEXT_HIDDEN):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tok),
        d_model=hidden,
        d_kv=8,
        d_ff=2 * hidden,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return seeded(seed, lambda: T5EncoderModel(config))


def autoencoder_kl(
    seed: int, latent_channels: int, scaling_factor: float, shift_factor, stages: int = 2
):
    """An ``AutoencoderKL`` with ``stages`` blocks: ``vae_scale_factor`` ``2**(stages-1)``."""
    from diffusers import AutoencoderKL

    def build():
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * stages,
            up_block_types=("UpDecoderBlock2D",) * stages,
            block_out_channels=(8,) * (stages - 1) + (16,),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    vae = seeded(seed, build)
    sharpen_decoder(vae.decoder)
    return vae


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                      max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                      use_dynamic_shifting=True)  # fmt: skip
"""FLUX.1-dev's published scheduler settings (LongCat-Image and Ovis-Image use them too)."""


# -- FLUX.1 and its relatives (LongCat-Image, Ovis-Image) -------------------------
def flux_like(cls, seed: int, in_channels: int = 16, **config):
    """A FLUX-layout transformer of class ``cls``: 2 double + 2 single blocks, 4 heads of 16."""
    return seeded(
        seed,
        cls,
        patch_size=1,
        in_channels=in_channels,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),
        **config,
    )


def flux_family(path, class_name: str, seed: int, parts: dict, classes: dict | None = None,
                vae_channels: int = 4, vae_stages: int = 2) -> Path:  # fmt: skip
    """Save ``parts`` (transformer, encoders, tokenizers) with FLUX.1's VAE and scheduler."""
    vae = autoencoder_kl(seed + 2, vae_channels, 0.3611, 0.1159, vae_stages)
    parts = {**parts, "vae": vae, "scheduler": flow_scheduler(**FLUX_SCHEDULER)}
    return save_pipeline(Path(path), class_name, parts, classes)


def build_tiny_flux(path: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX.1-dev (``guidance_embeds=True``) or -schnell checkpoint at ``path``."""
    from diffusers import FluxTransformer2DModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    parts = {
        "transformer": flux_like(FluxTransformer2DModel, seed + 1, guidance_embeds=guidance_embeds,
                                 pooled_projection_dim=TEXT_HIDDEN),
        "text_encoder": clip_text_model(clip_tok, seed + 3),
        "text_encoder_2": t5_encoder(t5_tok, seed + 4),
        "tokenizer": clip_tok,
        "tokenizer_2": t5_tok,
    }  # fmt: skip
    classes = {"tokenizer_2": ("transformers", "T5TokenizerFast"),
               "image_encoder": (None, None), "feature_extractor": (None, None)}  # fmt: skip
    return flux_family(path, "FluxPipeline", seed, parts, classes)


# -- Z-Image -----------------------------------------------------------------------
# Qwen3's chat template, reduced to what Z-Image's prompt encoding uses: user turns and
# the generation prompt, with an empty thinking block when enable_thinking is false.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def qwen3_tokenizer():
    """A's tiny Qwen2 BPE tokenizer with :data:`QWEN3_CHAT_TEMPLATE`."""
    from ithaca.testing.tiny import train_tokenizer

    tok = train_tokenizer()
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def qwen3_text_encoder(tok, seed: int, hidden: int = TEXT_HIDDEN):
    """A 3-layer ``Qwen3Model`` (diffusers' Z-Image reads the second-to-last layer)."""
    from transformers import Qwen3Config, Qwen3Model

    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=pad,
        bos_token_id=pad,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    return seeded(seed, lambda: Qwen3Model(config))


def build_tiny_z_image(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Z-Image-Turbo checkpoint at ``path``: 30 heads of 8, 2 + 2 + 2 blocks."""
    from diffusers import ZImageTransformer2DModel

    tok = qwen3_tokenizer()
    transformer = seeded(
        seed + 1,
        ZImageTransformer2DModel,  # Z-Image's config but for these
        in_channels=4,
        dim=240,
        n_layers=2,
        cap_feat_dim=TEXT_HIDDEN,
        axes_dims=[2, 2, 4],
        axes_lens=[1024, 64, 64],
    )
    parts = {
        "transformer": transformer,
        "vae": autoencoder_kl(seed + 2, 4, 0.3611, 0.1159),
        "text_encoder": qwen3_text_encoder(tok, seed + 3),
        "tokenizer": tok,
        # Z-Image-Turbo's published scheduler settings.
        "scheduler": flow_scheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
        ),
    }
    return save_pipeline(Path(path), "ZImagePipeline", parts)


# -- SD3 / SD3.5 ---------------------------------------------------------------------
def build_tiny_sd3(path: str | os.PathLike, seed: int = 0, dual_attention: bool = True) -> Path:
    """A tiny SD3.5 checkpoint at ``path``: 2 MMDiT blocks, 4 heads of 16, QK RMS norms.

    ``dual_attention=True`` gives block 0 SD3.5-medium's second, image-only attention
    (the last block never has one, as in the real model); False is SD3.5-large-like.
    """
    from diffusers import SD3Transformer2DModel

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer(max_length=256)
    clip_hidden = TEXT_HIDDEN // 2  # both CLIP widths side by side fit T5's width
    transformer = seeded(
        seed + 1,
        SD3Transformer2DModel,  # SD3's config but for these
        sample_size=16,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN,
        caption_projection_dim=64,
        pooled_projection_dim=2 * clip_hidden,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if dual_attention else (),
        qk_norm="rms_norm",
    )
    clips = [
        clip_text_model(clip_tok, seed + 3 + i, with_projection=True, hidden=clip_hidden)
        for i in range(2)
    ]
    parts = {
        "transformer": transformer,
        "vae": autoencoder_kl(seed + 2, 4, 1.5305, 0.0609),
        "text_encoder": clips[0],
        "text_encoder_2": clips[1],
        "text_encoder_3": t5_encoder(t5_tok, seed + 5),
        "tokenizer": clip_tok,
        "tokenizer_2": clip_tok,
        "tokenizer_3": t5_tok,
        # SD3.5's published scheduler settings.
        "scheduler": flow_scheduler(num_train_timesteps=1000, shift=3.0),
    }
    classes = {"tokenizer_3": ("transformers", "T5TokenizerFast"),
               "image_encoder": (None, None), "feature_extractor": (None, None)}  # fmt: skip
    return save_pipeline(Path(path), "StableDiffusion3Pipeline", parts, classes)


# -- LongCat-Image -----------------------------------------------------------------
def build_tiny_longcat_image(path: str | os.PathLike, seed: int = 0, edit: bool = False) -> Path:
    """A tiny LongCat-Image (or, ``edit=True``, -Edit) checkpoint at ``path``.

    FLUX-like, 2 + 2 blocks, 4 heads of 16. The real pipelines hard-code 16 latent
    channels, so the VAE has 16 and the transformer 64 input channels. For t2i the
    ``text_processor`` (only used by diffusers' prompt rewriting) is not written: load
    the reference with ``text_processor=None``. For edit it holds the Qwen2-VL image
    processor (and the tokenizer), and the VAE has 4 stages (``vae_scale_factor`` 8,
    one packed token per 16 px) so that edit sizes, multiples of 16 px, can still give
    an odd token count.
    """
    from diffusers import LongCatImageTransformer2DModel

    from ithaca.testing.tiny import save_processor, train_tokenizer

    path = Path(path)
    tok = train_tokenizer()
    text_processor = (None, None)
    if edit:
        save_processor(tok, path / "text_processor")
        text_processor = ("transformers", "Qwen2VLProcessor")
    parts = {
        "transformer": flux_like(LongCatImageTransformer2DModel, seed + 1, 64,
                                 pooled_projection_dim=TEXT_HIDDEN),
        "text_encoder": qwen2_5_vl(tok, seed + 3, TEXT_HIDDEN, depth=1, fullatt_block_indexes=[0]),
        "tokenizer": tok,
    }  # fmt: skip
    name = "LongCatImageEditPipeline" if edit else "LongCatImagePipeline"
    return flux_family(path, name, seed, parts, {"text_processor": text_processor}, 16,
                       4 if edit else 2)  # fmt: skip


# -- Ovis-Image ----------------------------------------------------------------------
def build_tiny_ovis_image(path: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Ovis-Image checkpoint at ``path``: FLUX-like, 2 + 2 blocks, 4 heads of 16."""
    from diffusers import OvisImageTransformer2DModel

    tok = qwen3_tokenizer()
    parts = {
        "transformer": flux_like(OvisImageTransformer2DModel, seed + 1, out_channels=16),
        "text_encoder": qwen3_text_encoder(tok, seed + 3),
        "tokenizer": tok,
    }
    return flux_family(path, "OvisImagePipeline", seed, parts)
