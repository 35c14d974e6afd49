"""Pixels in and out: the input-image transforms, VAE encode / decode, uint8 output.

- Input image: resized so its longest side <= ``max_size`` and shortest >= ``min_size``
  (bicubic), both sides snapped to the stride (16 for the VAE, 14 for the ViT), then
  ``(u8 / 255 - 0.5) / 0.5``. An edit's output has the VAE-transformed input's size.
- VAE: FLUX autoencoder; encode keeps the posterior **mean** (the official code samples
  it), ``z = scale * (mean - shift)``; decode reads ``z / scale + shift`` (scale and shift:
  the VAE config's ``scaling_factor`` and ``shift_factor``).
- Output: ``uint8(clamp(x * 0.5 + 0.5, 0, 1) * 255)``, truncating like the official code.
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ithaca.models.bagel.loader import ImageLimits
from ithaca.models.bagel.sampling import patchify, unpatchify


def fitted_size(width: int, height: int, limits: ImageLimits) -> tuple[int, int]:
    """(W, H) after the transform's resize rule."""
    scale = min(limits.max_size / max(width, height), 1.0)
    scale = max(scale, limits.min_size / min(width, height))

    def snap(v: float) -> int:
        return max(limits.stride, round(v / limits.stride) * limits.stride)

    w, h = snap(width * scale), snap(height * scale)
    if max(w, h) > limits.max_size:  # snapping rounded the long side up
        scale = limits.max_size / max(w, h)
        w, h = snap(w * scale), snap(h * scale)
    return w, h


def resized(image: Image.Image, limits: ImageLimits) -> Image.Image:
    image = image.convert("RGB")
    size = fitted_size(*image.size, limits)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


to_pixels = VaeImageProcessor(do_resize=False, do_convert_rgb=True).preprocess
"""RGB image -> (1, 3, H, W) in [-1, 1]: diffusers' ``2 * u8 / 255 - 1`` is bit for bit
the official ``(u8 / 255 - 0.5) / 0.5`` (a power-of-two scale commutes with rounding)."""


@torch.no_grad()
def encode_image(model, vae, image: Image.Image, vae_lim, vit_lim, device) -> dict:
    """An edit's input through the VAE and the ViT's patching, as plain tensors and grids
    (what the conditioning broadcast carries): ``vae_tokens`` (n, p*p*C), clean latent
    tokens in the scaled latent space, on ``vae_grid``; ``vit_patches`` (m, 14*14*3),
    SigLIP patch rows, on ``vit_grid``."""
    image = resized(image, vae_lim)
    mean = vae.encode(to_pixels(image).to(device, vae.dtype)).latent_dist.mean.float()
    z = vae.config.scaling_factor * (mean - vae.config.shift_factor)  # (1, C, H/8, W/8)
    vit = to_pixels(resized(image, vit_lim)).to(device)  # (1, 3, H', W')
    p, q = model.cfg.latent_patch_size, model.vit_patch_size
    return {
        "vae_tokens": patchify(z, p),
        "vae_grid": (z.shape[2] // p, z.shape[3] // p),
        "vit_patches": patchify(vit, q),
        "vit_grid": (vit.shape[2] // q, vit.shape[3] // q),
    }


@torch.no_grad()
def decode_tokens(vae, tokens: torch.Tensor, grid):
    """Latent tokens -> (latent (1, C, h, w), decoded (1, 3, H, W), uint8 (H, W, 3))."""
    latent = unpatchify(tokens.float(), *grid)
    z = latent / vae.config.scaling_factor + vae.config.shift_factor
    decoded = vae.decode(z.to(vae.dtype)).sample.float()
    u8 = ((decoded * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255).to(torch.uint8)
    return latent, decoded, u8
