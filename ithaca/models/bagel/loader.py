"""Loading a Bagel checkpoint directory (the ``ByteDance-Seed/BAGEL-7B-MoT`` layout).

Read: ``llm_config.json`` (Qwen2), ``vit_config.json`` (SigLIP), ``ema.safetensors``
(official key names), ``ae.safetensors`` (FLUX autoencoder key names), the slow Qwen2
tokenizer files. Like the official loader: q/k-norm on, the ViT uses
``num_hidden_layers - 1`` layers (no head). Every key of ``ema.safetensors`` is a
parameter or buffer of the same name (``language_model.lm_head.weight`` is known and
skipped: generation never reads logits); a missing or unknown key raises ``ValueError``
naming it.

The real checkpoint carries no autoencoder config (FLUX: ch 128, ch_mult 1,2,4,4) and no
image-transform limits. An override file ``tiny_model.json`` (the golden fixture's
format: ``vae_params``, ``vae_group_norm_groups``, ``image_transforms``) in the checkpoint
directory or its parent, or named by ``$ITHACA_BAGEL_OVERRIDES``, replaces them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ithaca.models.bagel.model import Bagel, BagelConfig
from ithaca.runtime.loading import stream_weights

CHECKPOINT_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")
OVERRIDES_FILE = "tiny_model.json"
SKIPPED_KEYS = frozenset({"language_model.lm_head.weight"})
FLUX_VAE = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 16}
FLUX_LATENTS = {"scale_factor": 0.3611, "shift_factor": 0.1159}


@dataclass(frozen=True)
class ImageLimits:
    """An input image transform: longest side <= max, shortest >= min, sides % stride."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 1806336


REAL_VAE_LIMITS = ImageLimits(1024, 512, 16)
REAL_VIT_LIMITS = ImageLimits(980, 224, 14)


def is_bagel_checkpoint(path: str) -> bool:
    """A directory, or a hub repository, holding all of :data:`CHECKPOINT_FILES`."""
    if os.path.isdir(path):
        return all(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES)
    try:
        from huggingface_hub import file_exists, try_to_load_from_cache

        return all(  # the local hub cache first (HF_HUB_OFFLINE=1)
            isinstance(try_to_load_from_cache(path, f), str) or file_exists(path, f)
            for f in CHECKPOINT_FILES
        )
    except Exception:  # offline and not cached, or not a repository name
        return False


def overrides(path: str) -> dict:
    """The override file's contents, or {} (the real model's hard-coded values apply)."""
    candidates = [os.environ.get("ITHACA_BAGEL_OVERRIDES", "")]
    candidates += [os.path.join(path, OVERRIDES_FILE), os.path.join(path, "..", OVERRIDES_FILE)]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    return {}


def build(path: str) -> Bagel:
    """The network with the checkpoint's sizes, on the meta device (no memory)."""
    from transformers import Qwen2Config, SiglipVisionConfig

    llm = Qwen2Config.from_json_file(os.path.join(path, "llm_config.json"))
    vit = SiglipVisionConfig.from_json_file(os.path.join(path, "vit_config.json"))
    vit.num_hidden_layers -= 1  # the official loader drops the last layer
    vit._attn_implementation = "sdpa"
    with torch.device("meta"):
        return Bagel(llm, vit, BagelConfig())


def load_weights(model: Bagel, path: str, dtype: torch.dtype, device, shard=None) -> Bagel:
    """Every tensor of ``ema.safetensors`` into ``model`` (on ``meta``), streamed as the
    diffusers families' transformers are (:func:`ithaca.runtime.loading.stream_weights`:
    a missing or unknown key raises; ``shard``, HSDP's or tensor parallel's hook, splits
    the model on ``meta`` so each rank reads only the part it keeps)."""
    files = [os.path.join(path, "ema.safetensors")]
    model = stream_weights(
        model.to(dtype), files, device=device, dtype=dtype, shard=shard, skip=SKIPPED_KEYS
    )
    return model.requires_grad_(False)


def load_vae(path: str, over: dict, device):
    """diffusers' ``AutoencoderKL`` from ``ae.safetensors`` (fp32, FLUX key names), its
    config holding the latent scale and shift."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    p = {**FLUX_VAE, **FLUX_LATENTS, **over.get("vae_params", {})}
    n = len(p["ch_mult"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(p["ch"] * m for m in p["ch_mult"]),
        layers_per_block=p["num_res_blocks"],
        latent_channels=p["z_channels"],
        norm_num_groups=over.get("vae_group_norm_groups", 32),
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=p["scale_factor"],
        shift_factor=p["shift_factor"],
    )
    state = convert_ldm_vae_checkpoint(load_file(os.path.join(path, "ae.safetensors")), vae.config)
    vae.load_state_dict(state, strict=True)
    return vae.to(device).eval().requires_grad_(False)


def image_limits(over: dict) -> tuple[ImageLimits, ImageLimits]:
    """(VAE, ViT) input transforms: the override file's or the real model's."""
    t = over.get("image_transforms", {})
    vae, vit = (ImageLimits(**t[k]) if k in t else None for k in ("vae", "vit"))
    return vae or REAL_VAE_LIMITS, vit or REAL_VIT_LIMITS
