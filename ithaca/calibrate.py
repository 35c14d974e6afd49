"""``ithaca calibrate-teacache MODEL``: fit TeaCache coefficients by running a model.

Runs the model uncached with :class:`ithaca.cache.calibrate.TeaCacheCalibrator`
installed (a step cache that never skips and records (input change, output change)
pairs), then fits the polynomial TeaCache accumulates. A tool the CLI runs (it writes a
checkpoint's ``ithaca.json``, the server never runs it): it loads and drives a whole
pipeline, so it sits beside the CLI, above ``ithaca.models`` and ``ithaca.cache``.
"""

from __future__ import annotations

import torch

from ithaca.cache.calibrate import TeaCacheCalibrator
from ithaca.cache.teacache import fit_coefficients
from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.types import GenerationParams

DEFAULT_PROMPTS = (
    "a red circle on a blue background",
    "a photo of a cat sleeping on a sofa, soft morning light",
    "a watercolor landscape with mountains and a lake",
    "a city street at night with neon signs, rain on the ground",
    "a close-up portrait of an old man with a white beard",
    "a bowl of fruit on a wooden table, studio lighting",
)


def calibrate_teacache(
    model: str,
    prompts=DEFAULT_PROMPTS,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    degree: int = 4,
    dtype=None,
    images=(),
):
    """Run ``model`` uncached on ``prompts`` and fit TeaCache coefficients.

    ``images`` (PIL) go with every prompt: the input images of an edit model.
    Returns ``(coefficients, samples)``; one process (the fit does not need more).
    """
    state = ParallelState.single(device="cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model, state, dtype=dtype)
    # The probe is no user cache: installed directly, kept while no request asks for one.
    calibrator = TeaCacheCalibrator(pipe.transformer, pipe.cache_adapter(), state, pipe.runtime)
    pipe.install_cache(pipe.cache_default, cache=calibrator)
    for i, prompt in enumerate(prompts):
        params = GenerationParams(
            prompt=prompt,
            num_inference_steps=steps,
            width=width,
            height=height,
            seed=i,
            images=list(images),
        )
        pipe.generate([params])
    x, y = zip(*calibrator.samples, strict=True)
    return fit_coefficients(x, y, degree), calibrator.samples
