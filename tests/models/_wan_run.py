"""Module-level helpers the Wan tests send to every rank (and call in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.testing.distributed import parallel_state
from ithaca.testing.tiny_wan import build_tiny_wan
from ithaca.types import GenerationParams

KINDS = ("t2v_a14b", "i2v_a14b", "ti2v_5b")
FAMILIES = {"t2v_a14b": "Wan2.2-T2V-A14B", "i2v_a14b": "Wan2.2-I2V-A14B",
            "ti2v_5b": "Wan2.2-TI2V-5B"}  # fmt: skip
"""Support-matrix names of the tiny checkpoint kinds."""


def tiny_wan_paths(root: Path) -> dict[str, str]:
    """Tiny Wan checkpoints under ``root`` (built on first use, seed 0)."""
    paths = {}
    for kind in KINDS:
        path = root / kind
        if not (path / "model_index.json").is_file():
            build_tiny_wan(path, kind)
        paths[kind] = str(path)
    return paths


def run_pipeline(pipe, batch: list[dict]):
    """``(frames per request, final latents of the loop, experts per forward, results)``."""
    captured, experts = [], []
    decode, activate = pipe.decode, pipe.placement.activate

    def record_decode(job, latents):
        captured.append(latents.float().cpu())
        return decode(job, latents)

    def record_activate(index):
        experts.append(index)
        return activate(index)

    pipe.decode, pipe.placement.activate = record_decode, record_activate
    try:
        results = pipe.generate([GenerationParams(**b) for b in batch])
    finally:
        del pipe.decode, pipe.placement.activate  # back to the class / instance methods
    frames = [r.frames for r in results]
    return frames, (captured[-1] if captured else None), experts, results


def generate(layout: dict, path: str, batch: list[dict]):
    """Run ``batch`` under ``layout`` on this rank: (frames, latents, info)."""
    torch.manual_seed(0)
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        frames, latents, experts, _ = run_pipeline(pipe, batch)
        info = {
            "sharded": [list(r.sharded) for r in pipe.runtimes],
            "gathered": [list(r.gathered) for r in pipe.runtimes],
            "experts": experts,
            "has_text_encoder": pipe.text_encoder is not None,
            "has_vae": pipe.vae is not None,
        }
        for runtime in pipe.runtimes:
            runtime.remove()
        return frames, latents, info


def max_frame_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())
