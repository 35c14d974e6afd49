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

import torch

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
        self._masks: dict[int, list[bool]] = {}
        # middle blocks: [fn, n - bn); empty middle means nothing to cache
        self.middle_end = n - self.bn

    def begin(self, num_steps: int) -> None:
        super().begin(num_steps)
        self._masks: dict[int, list[bool]] = {}

    def mask(self, num_steps: int) -> list[bool] | None:
        """SCM's steps that must compute, for a request of ``num_steps`` steps."""
        if self.scm_policy is None:
            return None
        if num_steps not in self._masks:
            self._masks[num_steps] = scm_mask(self.scm_policy, num_steps)
        return self._masks[num_steps]

    def new_branch_state(self) -> dict:
        return {
            "fn_residual": None,
            "cached": 0,
            "continuous": 0,
            "seer": [TaylorSeer(self.taylorseer_order) for _ in range(2)],
        }

    def decide(self, fn_residual) -> list[bool]:
        """Per request of the call: whether its middle blocks are cached (agreed)."""
        wants: list[bool | torch.Tensor] = []  # device tensors: decided by a distance
        candidates = []  # (place, member, previous residual): decided by the distance
        for m in self.members:
            st = m.state
            previous, st["fn_residual"] = st["fn_residual"], fn_residual[m.rows]
            i, mask = m.step, self.mask(m.num_steps)
            must_compute = (
                previous is None
                or st["seer"][0].step is None
                or self.fn >= self.middle_end
                or i < self.warmup
                or i >= m.num_steps - 1
                or (mask is not None and mask[i])
                or (self.max_cached >= 0 and st["cached"] >= self.max_cached)
                or (self.max_continuous >= 0 and st["continuous"] >= self.max_continuous)
            )
            if not must_compute and self.thresh > 0 and not (mask is not None and self.scm_static):
                candidates.append((len(wants), m, previous))
            wants.append(not must_compute and mask is not None and self.scm_static)
        if candidates:
            pairs = [(m.state["fn_residual"], previous) for _, m, previous in candidates]
            changes = self.rel_l1_each(pairs).unbind()
            for (place, _, _), change in zip(candidates, changes, strict=True):
                wants[place] = change < self.thresh
        skips = self.agree_each(wants)
        for m, cache_it in zip(self.members, skips, strict=True):
            m.state["cached"] += cache_it
            m.state["continuous"] = m.state["continuous"] + 1 if cache_it else 0
        return skips

    def run_block(self, index, call, hidden, context, bound):
        if index == 0:
            self.stack_in = hidden
        if index < self.fn or index >= self.middle_end:
            output = call(*bound.args, **bound.kwargs)
            if index == self.fn - 1:
                out_hidden, _ = self.unpack(output)
                self.settle(self.decide(out_hidden - self.stack_in))
                self.stack_in = None
            return output
        # a middle block
        if index == self.fn:
            self.middle_in = (hidden, context)
        output = self.run_skippable(call, bound, hidden, context)
        if index < self.middle_end - 1:
            return output
        # The last middle block: a request that computed updates its TaylorSeers, one
        # that skipped adds their prediction of its middle residual.
        out_hidden, out_context = self.unpack(output)
        (in_hidden, in_context), self.middle_in = self.middle_in, None
        hiddens, contexts = [], []
        for m, skip in zip(self.members, self.skips, strict=True):
            seer, seer_context = m.state["seer"]
            h = out_hidden[m.rows]
            c = None if out_context is None else out_context[m.rows]
            if not skip:
                seer.update(h - in_hidden[m.rows], m.step)
                if c is not None:
                    seer_context.update(c - in_context[m.rows], m.step)
            else:
                h = h + seer.predict(m.step)
                if c is not None and seer_context.step is not None:
                    c = c + seer_context.predict(m.step)
            hiddens.append(h)
            contexts.append(c)
        if not any(self.skips):
            return output
        if len(hiddens) == 1:
            return self.pack(hiddens[0], contexts[0])
        return self.pack(torch.cat(hiddens), None if c is None else torch.cat(contexts))
