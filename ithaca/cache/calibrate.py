"""Fitting TeaCache coefficients for any model: ``ithaca calibrate-teacache MODEL``.

:class:`TeaCacheCalibrator` is a step cache that never skips: at every step it records
``x`` = the relative L1 change of the first block's modulated input and ``y`` = the
relative L1 change of the block stack's output, per CFG branch. A polynomial fitted
from ``x`` to ``y`` (:func:`ithaca.cache.fit_coefficients`) is what TeaCache
accumulates to estimate how far the output moved without computing it.
"""

from __future__ import annotations

from ithaca.cache.base import StepCache


class TeaCacheCalibrator(StepCache):
    name = "teacache_calibration"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.adapter.modulated_input is None:
            raise ValueError(f"{type(self.transformer).__name__} has no TeaCache indicator")
        self.samples: list[tuple[float, float]] = []
        """``(input change, output change)`` pairs over every request run so far."""

    def new_branch_state(self) -> dict:
        return {"indicator": None, "output": None, "current": None}

    def run_block(self, index, call, hidden, context, bound):
        st = self.branch_state
        if index == 0:
            st["current"] = self.adapter.modulated_input(self.blocks[0], bound.arguments)
            self.stats.record(self.step_index, self.branch, False)
        output = call(*bound.args, **bound.kwargs)
        if index == self.num_blocks - 1:
            out_hidden, _ = self.unpack(output)
            if st["indicator"] is not None:
                self.samples.append(
                    (
                        self.rel_l1(st["current"], st["indicator"]),
                        self.rel_l1(out_hidden, st["output"]),
                    )
                )
            st["indicator"], st["output"] = st.pop("current"), out_hidden
        return output


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
    seed: int = 0,
    dtype=None,
    images=(),
):
    """Run ``model`` uncached on ``prompts`` and fit TeaCache coefficients.

    ``images`` (PIL) go with every prompt: the input images of an edit model.
    Returns ``(coefficients, samples)``; one process (the fit does not need more).
    """
    from ithaca.cache.teacache import fit_coefficients
    from ithaca.engine.types import GenerationParams
    from ithaca.models.registry import load_pipeline
    from ithaca.parallel import ParallelState

    state = ParallelState.single(device=_device())
    pipe = load_pipeline(model, state, dtype=dtype)
    pipe.cache_default = (TeaCacheCalibrator.name, {})
    calibrator = pipe._install_cache((TeaCacheCalibrator.name, ()))
    for i, prompt in enumerate(prompts):
        params = GenerationParams(
            prompt=prompt,
            num_inference_steps=steps,
            width=width,
            height=height,
            seed=seed + i,
            images=list(images),
        )
        pipe.generate([params])
    x, y = zip(*calibrator.samples, strict=True)
    return fit_coefficients(x, y, degree), calibrator.samples


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
