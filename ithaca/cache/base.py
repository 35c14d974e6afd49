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

State is kept per request: a forward's batch is a list of :class:`Rows` (one request's
rows, at its own step of its own schedule; a step batch holds requests that joined at
different steps), and each request has its own per-branch state, decision and stats.
Where the requests of one forward decide differently, only the rows that compute run
the skippable blocks (gathered, then scattered back); the other rows pass through and
take their own cached residual, so no request's result depends on another's. One
forward makes the same collectives whatever the number of requests: one ``all_reduce``
of every request's distance sums and one of every request's decision.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Hashable
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

    @classmethod
    def merged(cls, stats: list[CacheStats]) -> CacheStats:
        out = cls()
        for s in stats:
            out.computed += s.computed
            out.cached += s.cached
            out.pattern += s.pattern
        return out

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


@dataclass(frozen=True)
class Rows:
    """One request's rows in a transformer call's batch, in batch order."""

    key: Hashable
    """The request (its state and stats are kept under this key until :meth:`forget`)."""
    count: int
    step: int
    """The request's own step index."""
    num_steps: int
    """The request's own step count."""


@dataclass
class Member:
    """A request during one transformer call: its rows (a slice of the batch), step,
    step count and this branch's state."""

    rows: slice
    step: int
    num_steps: int
    state: dict
    stats: CacheStats


def take_rows(value, index: torch.Tensor, batch: int):
    """``value`` (a block argument: a tensor, or a tuple / list / dict of them) with only
    the rows ``index`` of every tensor whose first dimension is the batch's (``batch``
    rows, at least 2); per-sequence tensors (RoPE tables) and scalars pass as they are."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(v, index, batch) for v in value)
    if isinstance(value, dict):
        return {k: take_rows(v, index, batch) for k, v in value.items()}
    return value


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
        """Every request's decisions since :meth:`begin` (one request: its own)."""
        self.num_steps = 0
        self.step_index = 0
        self.branch = 0
        self.members: list[Member] = []
        """The requests of the current transformer call, in batch order."""
        self.skips: list[bool] = []
        """This call's decisions, one per member (True: it reuses its cached work)."""
        self.computing: torch.Tensor | None = None
        """Rows that run the skippable blocks when the members decided differently
        (indices into the batch), else None: every row does the same."""
        self._states: dict[tuple, dict] = {}  # (request key, branch) -> state
        self._stats: dict[Hashable, CacheStats] = {}
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
        self._stats.clear()

    @contextlib.contextmanager
    def step(self, index: int, branch: int = 0, rows: list[Rows] | None = None):
        """Bracket one transformer call: step ``index`` of the CFG ``branch``. ``rows``:
        the requests of the batch, each at its own step (a step batch); None: the whole
        batch is one request at step ``index`` of :meth:`begin`'s ``num_steps``."""
        rows = rows or [Rows(None, -1, index, self.num_steps)]
        start, members = 0, []
        for r in rows:
            span = slice(None) if r.count < 0 else slice(start, start + r.count)
            start += r.count
            state = self._states.get((r.key, branch))
            if state is None:
                state = self._states[(r.key, branch)] = self.new_branch_state()
            stats = self._stats.setdefault(r.key, CacheStats())
            members.append(Member(span, r.step, r.num_steps, state, stats))
        self.members, self.computing = members, None
        self.step_index, self.branch, self._active = index, branch, True
        try:
            yield
        finally:
            self._active = False

    def forget(self, key: Hashable) -> CacheStats:
        """Drop a request's state (it left the batch); returns its stats."""
        for branch in [b for k, b in self._states if k == key]:
            del self._states[(key, branch)]
        return self._stats.pop(key, CacheStats())

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
        """The state of a call with one request (what a cache without rows uses)."""
        assert len(self.members) == 1, "a batch of several requests has one state each"
        return self.members[0].state

    def record(self, member: Member, cached: bool) -> None:
        member.stats.record(member.step, self.branch, cached)
        self.stats.record(member.step, self.branch, cached)

    def settle(self, skips: list[bool]) -> None:
        """This call's decisions, one per member: recorded in the stats, kept in
        :attr:`skips` and routed (:meth:`route`)."""
        self.skips = skips
        for m, skip in zip(self.members, skips, strict=True):
            self.record(m, skip)
        self.route([not skip for skip in skips])

    def run_skippable(self, call: Callable, bound, hidden, context):
        """A skippable block: every row passes through (all skip), only the computing
        rows run (the members disagree), or the block runs whole."""
        if all(self.skips):
            return self.pack(hidden, context)
        if self.computing is not None:
            return self.call_rows(call, bound, hidden, context)
        return call(*bound.args, **bound.kwargs)

    def route(self, computes: list[bool]) -> None:
        """Which rows run the skippable blocks: all, none, or (the members disagree) the
        rows of the members that compute, in :attr:`computing`."""
        self.computing = None
        if len(set(computes)) > 1:
            rows = [
                i
                for m, c in zip(self.members, computes, strict=True)
                if c
                for i in range(m.rows.start, m.rows.stop)
            ]
            self.computing = torch.tensor(rows, dtype=torch.long, device=self.state.device)

    def call_rows(self, call: Callable, bound, hidden, context):
        """Run a skippable block on the :attr:`computing` rows only; the other rows pass
        through unchanged (what a skipped block returns)."""
        index, batch = self.computing, hidden.shape[0]
        arguments = {k: take_rows(v, index, batch) for k, v in bound.arguments.items()}
        sub = inspect.BoundArguments(bound.signature, arguments)
        out_hidden, out_context = self.unpack(call(*sub.args, **sub.kwargs))
        # (rows computing, S, C) scattered into (B, S, C): the rest keep their input
        hidden = hidden.index_copy(0, index, out_hidden)
        if out_context is None or context is None:  # the block returns no context
            return self.pack(hidden, None)
        return self.pack(hidden, context.index_copy(0, index, out_context))

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
        by auto_pad is left out. Collective over the sequence-parallel axis. Reads the
        result back (calibration); the step loop uses :meth:`rel_l1_each`.
        """
        return self.rel_l1_each([(current, previous)]).item()

    def rel_l1_each(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """:meth:`rel_l1` of each ``(current, previous)`` pair (one per request), with
        one collective for all of them: ``(pairs,)`` float64 on the rank's device, not
        read back (:meth:`agree_each` reads the decisions made from it)."""
        sums = torch.stack([self._l1_sums(c, p) for c, p in pairs])  # (pairs, 2) float64
        if pairs[0][0].dim() >= 3:
            comm.all_reduce(sums, self.state.sp)  # sums over every rank's tokens
        return sums[:, 0] / sums[:, 1].clamp_min(1e-30)

    def _l1_sums(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        diff = (current.float() - previous.float()).abs()
        base = previous.float().abs()
        mask = self._valid_tokens(current) if current.dim() >= 3 else None
        if mask is None:
            return torch.stack([diff.sum(), base.sum()]).double()
        per_token = [(t * mask[:, :, None]).sum() for t in (diff.flatten(2), base.flatten(2))]
        return torch.stack(per_token).double()

    def agree_each(self, cache_it: list[bool | torch.Tensor]) -> list[bool]:
        """Per request of the call: True only if every rank of the sequence-parallel
        group would cache it. ``cache_it``: host decisions or 0-dim bool tensors on the
        rank's device (made from :meth:`rel_l1_each`); one collective and the forward's
        one read-back, none when every decision is on the host and the group is one rank.
        """
        sp = self.state.sp
        if not any(isinstance(c, torch.Tensor) for c in cache_it) and (
            sp.size == 1 or not cache_it
        ):
            return [bool(c) for c in cache_it]
        device = self.state.device
        # (requests,) int32 on the rank's device, 1: must compute. Host decisions become
        # fills (no host-to-device copy), device ones stay where they are.
        flags = torch.stack(
            [
                (~c).to(torch.int32)
                if isinstance(c, torch.Tensor)
                else torch.full((), 0 if c else 1, dtype=torch.int32, device=device)
                for c in cache_it
            ]
        )
        if sp.size > 1:  # every rank of the sp group reaches this all_reduce once per forward
            comm.all_reduce(flags, sp, op=dist.ReduceOp.MAX)
        return [f == 0 for f in flags.tolist()]  # the forward's one host sync

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
    def step(self, index: int, branch: int = 0, rows: list[Rows] | None = None):
        with contextlib.ExitStack() as stack:
            for cache in self.caches:
                stack.enter_context(cache.step(index, branch, rows))
            yield

    def forget(self, key: Hashable) -> CacheStats:
        return CacheStats.merged([cache.forget(key) for cache in self.caches])

    def remove(self) -> None:
        for cache in self.caches:
            cache.remove()

    @property
    def stats(self) -> CacheStats:
        return CacheStats.merged([cache.stats for cache in self.caches])
