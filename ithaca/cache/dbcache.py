"""Cache-DiT's methods, native: DBCache, TaylorSeer and step computation masking (SCM).

DBCache (dual block cache): the first ``Fn_compute_blocks`` blocks always run; the
relative L1 change of their residual against the previous step's decides whether the
middle blocks run or are replaced by the middle residual remembered from the last
computed step; the last ``Bn_compute_blocks`` blocks always run.

TaylorSeer replaces "the last middle residual" by its Taylor extrapolation in the step
index, from finite differences between computed steps (``taylorseer_order`` 1 or 2).

SCM fixes in advance which steps must compute: a policy (slow / medium / fast / ultra)
alternates runs of computed and cacheable steps; with ``scm_steps_policy="dynamic"`` a
cacheable step still has to pass the DBCache check, with ``"static"`` it always caches.
"""

from __future__ import annotations

import math

from ithaca.cache.base import StepCache

# (computed, cacheable) run lengths for a 28-step schedule; scaled to the real count.
SCM_POLICIES = {
    "slow": ([8, 3, 3, 2, 2, 2], [1, 1, 2, 2, 3]),
    "medium": ([6, 2, 2, 2, 2, 1], [1, 2, 3, 3, 4]),
    "fast": ([6, 1, 1, 1, 1, 1], [1, 3, 3, 4, 5]),
    "ultra": ([4, 1, 1, 1, 1], [2, 4, 5, 7]),
}


def scm_mask(policy: str, num_steps: int) -> list[bool]:
    """``True`` for steps that must compute. The first and last steps always compute."""
    if policy not in SCM_POLICIES:
        raise ValueError(f"scm_steps_mask_policy ({policy!r}) must be one of {list(SCM_POLICIES)}")
    compute_bins, cache_bins = SCM_POLICIES[policy]
    scale = num_steps / 28
    mask: list[bool] = []
    for i, run in enumerate(compute_bins):
        mask += [True] * max(1, round(run * scale))
        if i < len(cache_bins):
            mask += [False] * max(1, round(cache_bins[i] * scale))
    mask = (mask + [True] * num_steps)[:num_steps]
    mask[0] = mask[-1] = True
    return mask


class TaylorSeer:
    """Finite-difference Taylor expansion of a tensor in the step index."""

    def __init__(self, order: int):
        self.order = order
        self.derivatives: list = []
        self.step: int | None = None

    def update(self, value, step: int) -> None:
        new = [value]
        if self.step is not None and step > self.step:
            gap = step - self.step
            for k in range(min(self.order, len(self.derivatives))):
                new.append((new[k] - self.derivatives[k]) / gap)
        self.derivatives, self.step = new, step

    def predict(self, step: int):
        dt = step - self.step
        out = self.derivatives[0]
        for k in range(1, len(self.derivatives)):
            out = out + self.derivatives[k] * (dt**k / math.factorial(k))
        return out


class DBCache(StepCache):
    name = "cache_dit"

    def __init__(
        self,
        *args,
        Fn_compute_blocks: int = 1,  # the reference API spells these with capitals
        Bn_compute_blocks: int = 0,
        max_warmup_steps: int = 4,
        residual_diff_threshold: float = 0.24,
        max_cached_steps: int = -1,
        max_continuous_cached_steps: int = -1,
        enable_taylorseer: bool = False,
        taylorseer_order: int = 1,
        scm_steps_mask_policy: str | None = None,
        scm_steps_policy: str = "dynamic",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        n = self.num_blocks
        if not 1 <= Fn_compute_blocks <= n:
            raise ValueError(f"Fn_compute_blocks ({Fn_compute_blocks}) must be in 1..{n}")
        if not 0 <= Bn_compute_blocks <= n - Fn_compute_blocks:
            raise ValueError(
                f"Bn_compute_blocks ({Bn_compute_blocks}) must be in 0..{n - Fn_compute_blocks} "
                f"with Fn_compute_blocks={Fn_compute_blocks} of {n} blocks"
            )
        if not residual_diff_threshold >= 0:
            raise ValueError(f"residual_diff_threshold ({residual_diff_threshold!r}) must be >= 0")
        if taylorseer_order not in (1, 2):
            raise ValueError(f"taylorseer_order ({taylorseer_order!r}) must be 1 or 2")
        if scm_steps_policy not in ("dynamic", "static"):
            raise ValueError(f"scm_steps_policy ({scm_steps_policy!r}) must be dynamic or static")
        if scm_steps_mask_policy is not None:
            scm_mask(scm_steps_mask_policy, 2)  # validates the name
        self.fn, self.bn = Fn_compute_blocks, Bn_compute_blocks
        self.warmup = max_warmup_steps
        self.thresh = float(residual_diff_threshold)
        self.max_cached = max_cached_steps
        self.max_continuous = max_continuous_cached_steps
        self.taylorseer_order = taylorseer_order if enable_taylorseer else 0
        self.scm_policy, self.scm_static = scm_steps_mask_policy, scm_steps_policy == "static"
        self._mask: list[bool] | None = None
        # middle blocks: [fn, n - bn); empty middle means nothing to cache
        self.middle_end = n - self.bn

    def begin(self, num_steps: int) -> None:
        super().begin(num_steps)
        self._mask = scm_mask(self.scm_policy, num_steps) if self.scm_policy else None

    def new_branch_state(self) -> dict:
        return {
            "fn_residual": None,
            "skip": False,
            "cached": 0,
            "continuous": 0,
            "seer": [TaylorSeer(self.taylorseer_order) for _ in range(2)],
        }

    def decide(self, fn_residual) -> bool:
        st = self.branch_state
        previous, st["fn_residual"] = st["fn_residual"], fn_residual
        i = self.step_index
        must_compute = (
            previous is None
            or st["seer"][0].step is None
            or self.fn >= self.middle_end
            or i < self.warmup
            or i >= self.num_steps - 1
            or (self._mask is not None and self._mask[i])
            or (self.max_cached >= 0 and st["cached"] >= self.max_cached)
            or (self.max_continuous >= 0 and st["continuous"] >= self.max_continuous)
        )
        if must_compute:
            cache_it = False
        elif self._mask is not None and self.scm_static:
            cache_it = True
        else:
            cache_it = self.thresh > 0 and self.rel_l1(fn_residual, previous) < self.thresh
        cache_it = self.agree(cache_it)
        st["cached"] += cache_it
        st["continuous"] = st["continuous"] + 1 if cache_it else 0
        return cache_it

    def run_block(self, index, call, hidden, context, bound):
        st = self.branch_state
        if index == 0:
            st["stack_in"] = hidden
        if index < self.fn or index >= self.middle_end:
            output = call(*bound.args, **bound.kwargs)
            if index == self.fn - 1:
                out_hidden, _ = self.unpack(output)
                st["skip"] = self.decide(out_hidden - st.pop("stack_in"))
                self.stats.record(self.step_index, self.branch, st["skip"])
            return output
        # a middle block
        if st["skip"]:
            if index == self.middle_end - 1:
                hidden = hidden + st["seer"][0].predict(self.step_index)
                if context is not None and st["seer"][1].step is not None:
                    context = context + st["seer"][1].predict(self.step_index)
            return self.pack(hidden, context)
        if index == self.fn:
            st["middle_in"] = (hidden, context)
        output = call(*bound.args, **bound.kwargs)
        if index == self.middle_end - 1:
            out_hidden, out_context = self.unpack(output)
            in_hidden, in_context = st.pop("middle_in")
            st["seer"][0].update(out_hidden - in_hidden, self.step_index)
            if out_context is not None:
                st["seer"][1].update(out_context - in_context, self.step_index)
        return output
