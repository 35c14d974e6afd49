"""Per-request step-cache state: requests at different steps share one forward, each
with its own cache decisions, and each ends exactly where it ends alone.

Pyramid: the toy transformer (4 blocks, one row per request, a 10-step CFG loop), one
process: a request joining a running batch at step k gives its solo cached latents
(5e-6: the toy's rows are not batch-invariant) and its solo skip pattern, for TeaCache
and DBCache (with TaylorSeer), and the batch hit a step where the requests decided
differently (so the gathered-rows path ran), with one host read-back per forward (the
decision; every tensor read the cache makes is counted). One 2-rank Ulysses cell: the
same on both ranks, still one read-back per forward with the agreement collective. The
engine-level cells (tiny Qwen-Image, in process and on a worker group) are in
tests/engine/test_continuous*.py.
"""

import contextlib
import os
import sys

import pytest
import torch

import ithaca.cache
from ithaca.cache import Rows, build_cache
from ithaca.config import CacheConfig, ParallelConfig
from ithaca.parallel import ParallelState, apply_guidance, apply_sequence_parallel, predict_branches
from ithaca.testing.distributed import parallel_state
from tests.cache.test_step_cache import IMAGE_LEN, TOY_ADAPTER
from tests.parallel import toy

CACHES = {
    "teacache": ("tea_cache", {"rel_l1_thresh": 0.3}),
    "dbcache_taylorseer": (
        "cache_dit",
        {"residual_diff_threshold": 0.3, "max_warmup_steps": 2, "enable_taylorseer": True},
    ),
}


READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


@contextlib.contextmanager
def host_reads(caller: str = os.path.dirname(ithaca.cache.__file__)):
    """A list that counts every read of a tensor's values into Python made by code in
    ``caller`` (a folder) while open."""
    count = [0]
    saved = {name: torch.Tensor.__dict__.get(name) for name in READS}

    def counted(name):
        read = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            count[0] += sys._getframe(1).f_code.co_filename.startswith(caller)
            return read(self, *args, **kwargs)

        return wrapper

    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield count
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def run(state, backend, options, requests):
    """``requests``: ``(name, joins at batch step, steps, seed)``. Each is one row with its
    own noise and prompt; every batch step runs one CFG forward pair over the members.
    Returns ``({name: (latents, skip pattern as (own step, branch, cached))}, the most
    host read-backs one forward made)``."""
    torch.manual_seed(0)
    model = toy.ToyTransformer(layers=4).eval()
    if state.sp.size > 1:
        runtime = apply_sequence_parallel(model, toy.PLAN_BLOCK, state)
        for block in model.blocks:
            block.attn = runtime.attention
    cache = build_cache(CacheConfig.from_dict(backend, options), model, TOY_ADAPTER, state)
    cache.begin(0)
    live, done, batch_step, reads = {}, {}, 0, []
    while len(done) < len(requests):
        for name, at, steps, seed in requests:
            if at == batch_step:
                latents, txt, _, mask = toy.make_inputs(IMAGE_LEN, batch=1, seed=seed)
                live[name] = {"x": latents, "txt": txt, "mask": mask, "i": 0, "n": steps}
        members = list(live.items())
        x = torch.cat([r["x"] for _, r in members])
        t = torch.cat([torch.full((1,), 1.0 - r["i"] / r["n"]) for _, r in members])
        txt = torch.cat([r["txt"] for _, r in members])
        mask = torch.cat([r["mask"] for _, r in members])
        rows = [Rows(name, 1, r["i"], r["n"]) for name, r in members]

        def predict(branch, x=x, t=t, txt=txt, mask=mask, rows=rows, at=batch_step):
            prompt = txt if branch == 0 else torch.zeros_like(txt)
            with torch.no_grad(), cache.step(at, branch, rows), host_reads() as count:
                out = model(x, prompt, t, mask)
            reads.append(count[0])
            return out

        pos, neg = predict_branches(state, predict)
        guided = apply_guidance(pos, neg, 3.0)
        for row, (name, r) in enumerate(members):
            r["x"] = r["x"] - guided[row : row + 1] / r["n"]
            r["i"] += 1
            if r["i"] == r["n"]:
                stats = cache.forget(name)
                done[name] = (live.pop(name)["x"], stats.pattern)
        batch_step += 1
    return done, max(reads)


def run_layout(layout, backend, options, requests):
    with parallel_state(ParallelConfig(**layout)) as state:
        return run(state, backend, options, requests)


def disagreed(result: dict, requests) -> bool:
    """Some batch step where two members of the batch decided differently."""
    at = {name: start for name, start, _, _ in requests}
    by_step: dict = {}
    for name, (_, pattern) in result.items():
        for step, branch, cached in pattern:
            by_step.setdefault((at[name] + step, branch), set()).add(cached)
    return any(len(v) > 1 for v in by_step.values())


JOINED = [("long", 0, 10, 1), ("late", 3, 8, 2), ("short", 4, 5, 3)]


@pytest.mark.parametrize("backend,options", CACHES.values(), ids=CACHES.keys())
def test_a_joining_request_gets_its_solo_cached_result(backend, options):
    state = ParallelState.single()
    batched, reads = run(state, backend, options, JOINED)
    assert reads == 1, reads  # the decision, read once per forward
    assert disagreed(batched, JOINED), "the requests never decided differently"
    for name, _, steps, seed in JOINED:
        solo_latents, solo_pattern = run(state, backend, options, [(name, 0, steps, seed)])[0][name]
        latents, pattern = batched[name]
        assert pattern == solo_pattern, name  # its own decisions, at its own steps
        assert any(cached for _, _, cached in pattern), name
        err = (latents - solo_latents).abs().max().item()
        assert err <= 5e-6, f"{name}: {err:.2e}"


def test_joined_requests_on_ulysses_2_equal_one_rank(worker_pool):
    backend, options = CACHES["teacache"]
    reference, _ = run(ParallelState.single(), backend, options, JOINED)
    results = worker_pool(2).run(run_layout, dict(ulysses_degree=2), backend, options, JOINED)
    for result, reads in results:
        assert reads == 1, reads  # the agreed decision, read once per forward
        for name in reference:
            assert result[name][1] == reference[name][1], name
            err = (result[name][0] - reference[name][0]).abs().max().item()
            assert err <= 1e-5, f"{name}: {err:.2e}"
