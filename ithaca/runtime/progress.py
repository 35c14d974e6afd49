"""Progress through the final decode, so a long but alive decode is never taken for a hang;
and the steps after which the loop reports a preview (:func:`preview_steps`).

A decode is cut into *chunks* the VAE already runs one by one: diffusers' video VAEs
(``AutoencoderKLWan`` / ``AutoencoderKLQwenImage``) call their ``decoder`` once per latent
frame inside ``_decode``, image VAEs run their decoder's ``up_blocks`` in turn. A forward
hook on each chunk's module reports ``DecodeEvent(ids, k, n)`` to the ``on_decode``
callback (returning rank only); the engine resets the decode clock on each and gives every chunk
``measured decode time / n`` instead of the whole decode's time (docs/serving.md).

The hooks read no tensor. On an accelerator a module's forward returns when its kernels
are queued, not done, so the hook waits for the device first: progress then means work
finished (one wait per chunk, in the decode only, never in the step loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ithaca.types import DecodeCallback, DecodeEvent


def preview_steps(total: int, count: int) -> set[int]:
    """0-based steps after which to report ``count`` evenly spaced previews (not the last)."""
    if count <= 0 or total <= 1:
        return set()
    steps = {round((j + 1) * total / (count + 1)) - 1 for j in range(count)}
    return {s for s in steps if 0 <= s < total - 1}


def up_block_chunks(vae: nn.Module | None) -> tuple[list[nn.Module], int]:
    """An image VAE's chunks: its decoder's up-blocks, each run once (none without them)."""
    blocks = list(getattr(getattr(vae, "decoder", None), "up_blocks", None) or ())
    return blocks, len(blocks)


@contextlib.contextmanager
def report_decode(
    chunks: tuple[list[nn.Module], int],
    ids: list[str],
    callback: DecodeCallback | None,
    device: torch.device,
) -> Iterator[None]:
    """While inside, each forward of one of the ``chunks`` modules reports one more of
    their ``n`` chunks done (``chunks`` is ``(modules, n)``).

    ``DecodeEvent(ids, 0, n)`` goes out on entry (the decode clock starts with the first
    chunk's budget); a module that runs more often than counted (tiled decoding calls the
    decoder once per tile) still reports each time, its chunk number capped at ``n``.
    """
    modules, n = chunks
    if callback is None or not modules or n < 1:
        yield
        return
    done = 0

    def chunk_done(module: nn.Module, args, output) -> None:
        nonlocal done
        if device.type != "cpu":
            torch.accelerator.synchronize(device)  # the chunk's kernels, not their launch
        done += 1
        callback(DecodeEvent(ids, min(done, n), n))

    callback(DecodeEvent(ids, 0, n))
    handles = [m.register_forward_hook(chunk_done) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
