"""The machinery every step cache shares: block wrapping, per-branch state, agreement.

A step cache decides, once per transformer forward, whether the expensive middle of
the block stack can be replaced by a residual remembered from an earlier step. It is
installed from outside: each block's ``forward`` is wrapped on the instance (the
model's code is untouched), and the denoising loop brackets every transformer call
with ``with cache.step(i, branch):`` so that each CFG branch keeps its own state.

Decisions are computed from distances reduced over the sequence-parallel axis (sums of
this rank's valid tokens, ``all_reduce``-d), so every rank of a sequence-parallel
group holds the same numbers and takes the same decision; the decision itself is then
agreed with one more ``all_reduce`` (any rank that must compute makes every rank
compute), so a rounding difference can never split the group.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from ithaca.parallel import comm
from ithaca.parallel.state import ParallelState


@dataclass(frozen=True)
class BlockCacheAdapter:
    """How a family's transformer blocks look to a step cache."""

    blocks: str | tuple[str, ...]
    """Attribute(s) holding the ``nn.ModuleList`` s of blocks, in the order the forward
    runs them: FLUX's double-stream then single-stream blocks are one stack to a cache
    (TeaCache probes the first block and caches the residual over all of them)."""
    hidden_arg: str = "hidden_states"
    context_arg: str = "encoder_hidden_states"
    returns: str = "context_hidden"
    """What every block returns: ``"context_hidden"`` (diffusers Qwen-Image, FLUX's both
    kinds, SD3, whose last block returns ``None`` context), ``"hidden_context"``, or
    ``"hidden"`` alone (Wan: the context is only read; Z-Image: one unified sequence)."""
    modulated_input: Callable[[nn.Module, dict], torch.Tensor] | None = None
    """TeaCache's indicator: the first block's timestep-modulated input, from the block
    and its bound forward arguments."""
    teacache_coefficients: tuple[float, ...] = ()
    """Polynomial (highest power first) mapping the indicator's relative L1 change to
    the output's; empty means uncalibrated (the identity is used)."""


@dataclass
class CacheStats:
    """What a cache did during one request (all branches)."""

    computed: int = 0
    cached: int = 0
    pattern: list[tuple[int, int, bool]] = field(default_factory=list)
    """``(step, branch, cached)`` in call order."""

    def record(self, step: int, branch: int, cached: bool) -> None:
        self.pattern.append((step, branch, cached))
        if cached:
            self.cached += 1
        else:
            self.computed += 1

    @property
    def hit_ratio(self) -> float:
        total = self.computed + self.cached
        return self.cached / total if total else 0.0

    def as_dict(self) -> dict:
        return {
            "computed_steps": self.computed,
            "cached_steps": self.cached,
            "hit_ratio": round(self.hit_ratio, 4),
        }


class StepCache:
    """Base class: wraps the blocks, tracks step / branch, reduces and agrees.

    Subclasses implement :meth:`run_block` and keep per-branch state in
    ``self.branch_state`` (a dict created by :meth:`new_branch_state`).
    """

    name = "cache"

    def __init__(
        self,
        transformer: nn.Module,
        adapter: BlockCacheAdapter,
        state: ParallelState,
        padding=None,
    ):
        self.transformer = transformer
        self.adapter = adapter
        self.state = state
        self.padding = padding
        """Knows the valid length of an auto_pad-ed sequence (the SP runtime), or None."""
        names = (adapter.blocks,) if isinstance(adapter.blocks, str) else adapter.blocks
        self.blocks: list[nn.Module] = [b for name in names for b in getattr(transformer, name)]
        """Every block of the stack, in run order; a block's index is its place here."""
        self.num_blocks = len(self.blocks)
        self.stats = CacheStats()
        self.num_steps = 0
        self.step_index = 0
        self.branch = 0
        self._states: dict[int, dict] = {}
        self._active = False
        # What was installed on each instance before (a compiled forward), put back on remove.
        self._previous = [block.__dict__.get("forward") for block in self.blocks]
        for index, block in enumerate(self.blocks):
            block.forward = self._wrap(index, block.forward)

    # -- what the denoising loop calls ------------------------------------------
    def begin(self, num_steps: int) -> None:
        """Reset for a new request (or batch) of ``num_steps`` steps."""
        self.num_steps = num_steps
        self.stats = CacheStats()
        self._states.clear()

    @contextlib.contextmanager
    def step(self, index: int, branch: int = 0):
        """Bracket one transformer call: step ``index`` of the CFG ``branch``."""
        self.step_index, self.branch, self._active = index, branch, True
        try:
            yield
        finally:
            self._active = False

    def remove(self) -> None:
        """Unwrap the blocks."""
        for block, previous in zip(self.blocks, self._previous, strict=True):
            if previous is not None:
                block.forward = previous
            elif "forward" in block.__dict__:
                del block.forward

    # -- for subclasses ----------------------------------------------------------
    @property
    def branch_state(self) -> dict:
        if self.branch not in self._states:
            self._states[self.branch] = self.new_branch_state()
        return self._states[self.branch]

    def new_branch_state(self) -> dict:
        return {}

    def run_block(self, index: int, call: Callable, hidden, context, bound) -> tuple:
        raise NotImplementedError

    def pack(self, hidden, context):
        """A block's return value in the family's order."""
        if self.adapter.returns == "hidden":
            return hidden
        return (context, hidden) if self.adapter.returns == "context_hidden" else (hidden, context)

    def unpack(self, output) -> tuple:
        """``(hidden, context or None)`` from a block's return value."""
        if self.adapter.returns == "hidden":
            return output, None
        first, second = output
        return (second, first) if self.adapter.returns == "context_hidden" else (first, second)

    def rel_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """``sum|cur - prev| / sum|prev|`` over every valid token of the whole sequence.

        ``current``/``previous`` are this rank's ``(B, S_local, ...)`` shards (or
        replicated ``(B, C)`` tensors when ``token_dim`` does not apply). Padding added
        by auto_pad is left out. Collective over the sequence-parallel axis.
        """
        diff = (current.float() - previous.float()).abs()
        base = previous.float().abs()
        sums = torch.stack([diff.sum(), base.sum()]).double()
        if current.dim() >= 3:
            mask = self._valid_tokens(current)
            if mask is not None:
                per_token = [
                    (t * mask[:, :, None]).sum() for t in (diff.flatten(2), base.flatten(2))
                ]
                sums = torch.stack(per_token).double()
            comm.all_reduce(sums, self.state.sp)  # sums over every rank's tokens
        return (sums[0] / sums[1].clamp_min(1e-30)).item()

    def agree(self, cache_it: bool) -> bool:
        """True only if every rank of the sequence-parallel group would cache."""
        sp = self.state.sp
        if sp.size == 1:
            return cache_it
        flag = torch.tensor([0 if cache_it else 1], dtype=torch.int32, device=self.state.device)
        # Every rank of the sp group reaches this all_reduce once per forward.
        comm.all_reduce(flag, sp, op=dist.ReduceOp.MAX)
        return flag.item() == 0

    # -- internals -----------------------------------------------------------------
    def _valid_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.padding is None:
            return None
        sp, local = self.state.sp, x.shape[1]
        valid = self.padding.valid_length(local * sp.size)
        if valid is None:
            return None
        positions = torch.arange(sp.rank * local, (sp.rank + 1) * local, device=x.device)
        return (positions < valid).to(torch.float32).expand(x.shape[0], local)

    def _wrap(self, index: int, forward: Callable) -> Callable:
        signature = inspect.signature(forward)  # per block: a stack may mix block classes

        def wrapped(*args, **kwargs):
            if not self._active:
                return forward(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            hidden = bound.arguments[self.adapter.hidden_arg]
            context = bound.arguments.get(self.adapter.context_arg)
            return self.run_block(index, forward, hidden, context, bound)

        return wrapped


class CacheGroup:
    """One step cache per transformer (Wan2.2's two experts), driven as one cache.

    Every member sees every ``step``; only the transformer that actually runs consults
    its own, so each expert keeps its own per-branch state and residuals.
    """

    def __init__(self, caches: list[StepCache]):
        self.caches = caches
        self.name = caches[0].name

    def begin(self, num_steps: int) -> None:
        for cache in self.caches:
            cache.begin(num_steps)

    @contextlib.contextmanager
    def step(self, index: int, branch: int = 0):
        with contextlib.ExitStack() as stack:
            for cache in self.caches:
                stack.enter_context(cache.step(index, branch))
            yield

    def remove(self) -> None:
        for cache in self.caches:
            cache.remove()

    @property
    def stats(self) -> CacheStats:
        merged = CacheStats()
        for cache in self.caches:
            merged.computed += cache.stats.computed
            merged.cached += cache.stats.cached
            merged.pattern += cache.stats.pattern
        return merged
