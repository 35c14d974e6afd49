"""Module-level functions the multi-rank tests send to every rank (and call in-process)."""

from __future__ import annotations

import numpy as np

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.models.stepping import generate_stepwise
from ithaca.testing.distributed import parallel_state
from ithaca.types import GenerationParams


def generate(layout: dict, path: str, batch: list[dict]):
    """Run ``batch`` under ``layout``; return (images as uint8 arrays, final latents,
    info) with images and latents only on the returning rank; ``info`` says what the
    last forward sharded and gathered and which encoders this rank loaded."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        # Fused: the two requests of a batch share forwards, so prompts of different
        # lengths go through the shards padded, with a key mask.
        pipe.fuse_batches = True
        captured = []
        decode = pipe.decode

        def record(job, latents):
            captured.append(latents.float().cpu())
            return decode(job, latents)

        pipe.decode = record
        results = pipe.generate([GenerationParams(**b) for b in batch])
        images = [[np.asarray(im) for im in r.images] for r in results]
        info = {
            "sharded": list(pipe.runtime.sharded),
            "gathered": list(pipe.runtime.gathered),
            "has_text_encoder": pipe.text_encoder is not None,
            "has_vae": pipe.vae is not None,
        }
        pipe.runtime.remove()
        return images, (captured[-1] if captured else None), info


def fail_on_rank0(layout: dict, path: str) -> str:
    """Conditioning raises on the returning rank; every rank must raise, none may hang."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)

        def broken(request):
            raise ValueError("tokenizer exploded")

        pipe.condition = broken
        try:
            pipe.generate(
                [GenerationParams(prompt="x", width=64, height=64, num_inference_steps=2)]
            )
        except (RuntimeError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            pipe.runtime.remove()
        return "no error"


def cancel_after_first_step(layout: dict, path: str):
    """The returning rank's callback cancels after step 1; every rank must stop there."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        calls = []

        def callback(event):
            calls.append(event.step)
            return True

        params = GenerationParams(prompt="x", width=64, height=64, num_inference_steps=3, seed=1)
        result = pipe.generate([params], callback)[0]
        pipe.runtime.remove()
        return calls, result.metadata.get("cancelled"), result.metadata.get("steps_done")


def stepwise_join(layout: dict, path: str, batch: list[dict], joiner: dict):
    """Step-level batching under ``layout``: ``joiner`` joins after step 1, handed over by
    the returning rank's ``admit`` only. Returns (images by request id on the returning
    rank, every request's ``joined_at_batch_step`` as this rank saw it, boundaries seen)."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        boundaries = []

        def admit(accepts):
            boundaries.append(len(boundaries) + 1)
            return [GenerationParams(**joiner)] if len(boundaries) == 1 else []

        results = generate_stepwise(
            pipe,
            [GenerationParams(**b) for b in batch],
            admit=admit if pipe.is_returning_rank else None,
        )
        pipe.runtime.remove()
        images = {r.request_id: [np.asarray(im) for im in r.images] for r in results}
        joined = {r.request_id: r.metadata["batching"]["joined_at_batch_step"] for r in results}
        return images, joined, boundaries
