"""The probe behind ``ithaca calibrate-teacache`` (run by :mod:`ithaca.calibrate`).

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
