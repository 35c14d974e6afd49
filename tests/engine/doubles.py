"""A pipeline double for engine and server tests: deterministic, SPMD, cancellable.

Each request's image is a pure function of (prompt, seed, size, steps, guidance):
batched or alone, on 1 or N ranks, the bytes are the same. Every step all-reduces
over the replica axis (so a dead or stopped rank blocks the group, as a real model
would) and the cancel decision is broadcast from rank 0. ``ITHACA_FAKE_STEP_S`` slows
each step down for cancellation and crash tests. The decode reports DECODE_CHUNKS chunks
through ``on_decode``, as the real one does per up-block or latent frame; a prompt
holding ``slow-decode`` spends ``SLOW_DECODE_CHUNK_S`` on each, one holding
``stall-decode`` stops for ``STALL_DECODE_S`` after the decode began.
"""

from __future__ import annotations

import hashlib
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ithaca.parallel.comm import all_reduce, broadcast_object
from ithaca.runtime.checkpoint import StepCheckpoint
from ithaca.types import DecodeEvent, GenerationParams, GenerationResult, StepEvent

DECODE_CHUNKS = 4
SLOW_DECODE_CHUNK_S = 0.25
STALL_DECODE_S = 60.0


def _seed_of(p: GenerationParams) -> int:
    text = f"{p.prompt}|{p.negative_prompt}|{p.seed}|{p.guidance_scale}|{p.true_cfg_scale}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


class FakePipeline:
    def __init__(self, state, dtype=None, cache_backend=None, cache_config=None):
        self.state = state
        self.step_s = float(os.environ.get("ITHACA_FAKE_STEP_S", "0"))
        self.calls: list[int] = []  # batch sizes seen (in-process tests)
        self.device = state.device
        self.is_returning_rank = state.replica.rank == 0

    def _latents(self, p: GenerationParams, index: int, h: int, w: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed_of(p) + index)
        frames = p.num_frames or 1
        base = torch.rand(frames, 3, h // 8, w // 8, generator=g)
        if p.images:  # edits: blend in the input image's mean colour
            mean = torch.tensor(np.asarray(p.images[0].convert("RGB")), dtype=torch.float32).mean(
                (0, 1)
            )
            base = 0.5 * base + 0.5 * (mean / 255.0)[None, :, None, None]
        return base

    def _decode(self, lat: torch.Tensor, h: int, w: int) -> list[Image.Image]:
        up = torch.nn.functional.interpolate(lat, size=(h, w), mode="nearest")
        arr = (up.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]

    def resolve(self, p: GenerationParams) -> SimpleNamespace:
        """The per-request check the engine runs alone before batching."""
        for name, v in (("width", p.width or 64), ("height", p.height or 64)):
            if v % 16:
                raise ValueError(f"{name} ({v}) must be a multiple of 16")
        if p.images and p.num_frames:
            raise ValueError("this double is text-to-video: input_reference is not supported")
        steps = p.num_inference_steps or 4
        return SimpleNamespace(width=p.width or 64, height=p.height or 64, steps=steps)

    def generate(
        self, batch: list[GenerationParams], callback=None, on_decode=None
    ) -> list[GenerationResult]:
        self.calls.append(len(batch))
        for p in batch:
            self.resolve(p)
            # A check only made inside the batch (as `layers` was): poisons its batch.
            if "poison" in p.prompt:
                raise ValueError("prompt: this request is poisoned (test double)")
            if "crash" in p.prompt:  # an internal failure whose text must stay in the log
                raise RuntimeError("cannot read /srv/secret/model/weights.safetensors")
        steps = batch[0].num_inference_steps or 4
        items = []  # (request index, image index, latents)
        for i, p in enumerate(batch):
            h, w = p.height or 64, p.width or 64
            items += [(i, k, self._latents(p, k, h, w)) for k in range(max(1, p.num_images))]
        # A lone request with a checkpoint file resumes from its saved step, as the real
        # loop does (ithaca.runtime.checkpoint); its latents are the job's.
        job = SimpleNamespace(timesteps=range(steps), scheduler=SimpleNamespace(),
                              latents=items[0][2], seeds=[batch[0].seed])  # fmt: skip
        checkpoint = StepCheckpoint.of(self, [SimpleNamespace(params=p) for p in batch])
        start = 0
        if checkpoint is not None and (saved := checkpoint.load(job)) is not None:
            start, items[0] = saved[0], (0, 0, saved[1])
        for step in range(start, steps):
            for n, (i, k, lat) in enumerate(items):
                lat = (lat * 0.5 + 0.25).clamp(0, 1)
                # SPMD: every rank holds the same latents; the all-reduce averages identical
                # copies (exact in fp32 for 2 ranks) and blocks if a peer is gone.
                lat = all_reduce(lat.clone(), self.state.replica) / self.state.replica.size
                items[n] = (i, k, lat)
            if self.step_s:
                time.sleep(self.step_s)
            cancel = False
            if callback is not None:
                previews = None
                if any(p.partial_images for p in batch):
                    previews = [self._decode(lat[:1], 32, 32)[0] for _, _, lat in items]
                event = StepEvent([p.request_id for p in batch], step + 1, steps, previews)
                cancel = bool(callback(event))
            if checkpoint is not None:
                job.latents = items[0][2]
                checkpoint.after_step(step + 1, job)
            if broadcast_object(cancel, self.state.replica):
                return []
        self._report_decode(batch, on_decode)
        out = []
        for i, p in enumerate(batch):
            h, w = p.height or 64, p.width or 64
            lats = [lat for j, _, lat in items if j == i]
            res = GenerationResult(
                request_id=p.request_id, metadata={"seed": p.seed, "steps": steps}
            )
            if p.num_frames:
                frames = self._decode(lats[0], h, w)
                res.frames = np.stack([np.asarray(f) for f in frames])
                res.fps = p.fps or 8
            else:
                res.images = [self._decode(lat, h, w)[0] for lat in lats]
            out.append(res)
        return out

    @staticmethod
    def _report_decode(batch: list[GenerationParams], on_decode) -> None:
        if on_decode is None:
            return
        ids = [p.request_id for p in batch]
        slow = any("slow-decode" in p.prompt for p in batch)
        stall = any("stall-decode" in p.prompt for p in batch)
        for chunk in range(DECODE_CHUNKS + 1):  # 0: the decode begins
            if chunk and slow:
                time.sleep(SLOW_DECODE_CHUNK_S)
            if chunk and stall:  # alive but silent, as a decode stuck in a kernel
                time.sleep(STALL_DECODE_S)
            on_decode(DecodeEvent(ids, chunk, DECODE_CHUNKS))


def make_pipeline(state, **kwargs) -> FakePipeline:
    return FakePipeline(state, **kwargs)


def crash_on_load(state, **kwargs):
    raise RuntimeError("weights are corrupt (test double)")
