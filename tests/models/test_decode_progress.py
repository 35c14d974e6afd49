"""Decode progress on an image VAE: one event per up-block, the same image as without
the hooks, and no hook left behind. (Video VAEs, per latent frame: tests/models/test_wan.py.)
No processes; a tiny randomly initialised diffusers ``AutoencoderKL``."""

import torch
from diffusers import AutoencoderKL

from ithaca.runtime.progress import report_decode, up_block_chunks


def test_image_vae_reports_each_up_block_and_changes_nothing():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        plain = vae.decode(z).sample
        events = []
        chunks = up_block_chunks(vae)
        with report_decode(chunks, ["r"], events.append, torch.device("cpu")):
            reported = vae.decode(z).sample
    assert chunks[1] == 3 and [(e.chunk, e.chunks) for e in events] == [(k, 3) for k in range(4)]
    assert torch.equal(plain, reported)
    assert not any(block._forward_hooks for block in vae.decoder.up_blocks)
    assert up_block_chunks(None) == ([], 0)  # a pipeline without a VAE reports nothing
