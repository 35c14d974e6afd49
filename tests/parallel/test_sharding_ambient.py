"""The documented state-less sharding helpers: sp_shard / sp_gather / sp_shard_with_padding,
ShardingValidator() and get_sharding_validator(), and SequenceParallelConfig.

Pyramid: identities in one process without a process group; 2-rank gloo numerics
(inside a parallelized forward under Ulysses 2 and Ring 2, after
``SequenceParallelConfig.setup``, unequal shards, padding, ``convert_to_fp32``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ithaca.config import ParallelConfig
from ithaca.parallel import (
    SequenceParallelConfig,
    SequenceParallelInput,
    SequenceParallelOutput,
    ShardingValidator,
    apply_sequence_parallel,
    sp_gather,
    sp_shard,
    sp_shard_with_padding,
)
from ithaca.parallel.sharding import current_state, get_sharding_validator
from ithaca.testing.distributed import parallel_state
from tests.parallel import toy


class Intrusive(nn.Module):
    """A model that shards an inline tensor by hand (the seeds' "approach 2")."""

    _sp_plan = {  # noqa: RUF012 - plans are class-level data by design
        "proj": {"input": SequenceParallelInput(1, expected_dims=3)},
        "out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

    def __init__(self, fail: bool = False):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)
        self.fail = fail
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x):
        extra = torch.arange(8.0).view(1, 8, 1).expand(x.shape[0], 8, 4)  # inline, full length
        self.seen["extra_shard"] = sp_shard(extra, dim=1)
        if self.fail:
            raise RuntimeError("forward failed")
        h = self.proj(x) + self.seen["extra_shard"]
        self.seen["regathered"] = sp_gather(self.seen["extra_shard"], dim=1)
        return self.out(h)


def test_identities_without_a_process_group():
    x = torch.randn(2, 7, 3)
    assert current_state() is None
    assert sp_shard(x, dim=1) is x
    assert sp_shard(x, 1, False) is x  # the documented positional validate
    assert sp_gather(x, dim=1) is x
    shard, pad = sp_shard_with_padding(x, dim=1, pad_value=0.0)
    assert shard is x and pad == 0
    validator = ShardingValidator()
    with validator.track():
        h = validator.shard(x, "hidden_states", dim=1)
        assert validator.gather(h, "hidden_states", dim=1) is x
    validator.validate()
    assert get_sharding_validator() is get_sharding_validator()


def run_intrusive(layout: dict, fail: bool = False):
    with parallel_state(ParallelConfig(**layout)) as state:
        torch.manual_seed(0)
        model = Intrusive(fail)
        runtime = apply_sequence_parallel(model, state=state)
        x = torch.randn(2, 8, 4)
        outside_before = sp_shard(x, dim=1)
        error = None
        try:
            with torch.no_grad():
                out = model(x)
        except RuntimeError as exc:
            out, error = None, str(exc)
        outside_after = sp_shard(x, dim=1)
        runtime.remove()
        return {
            "rank": state.sp.rank,
            "shard": model.seen["extra_shard"],
            "regathered": model.seen.get("regathered"),
            "out": out,
            "outside_is_identity": outside_before is x and outside_after is x,
            "ambient_after": current_state() is not None,
            "error": error,
        }


@pytest.mark.parametrize("layout", [dict(ulysses_degree=2), dict(ring_degree=2)])
def test_sp_shard_inside_a_parallelized_forward_is_this_ranks_shard(worker_pool, layout):
    results = worker_pool(2).run(run_intrusive, layout)
    full = torch.arange(8.0).view(1, 8, 1).expand(2, 8, 4)
    torch.manual_seed(0)
    reference_model = Intrusive()
    with torch.no_grad():
        reference = reference_model(torch.randn(2, 8, 4))
    for r in results:
        assert torch.equal(r["shard"], full.chunk(2, dim=1)[r["rank"]])
        assert torch.equal(r["regathered"], full)
        assert (r["out"] - reference).abs().max().item() <= 1e-6
        assert r["outside_is_identity"]
        assert not r["ambient_after"]


def test_a_failing_forward_leaves_no_ambient_state(worker_pool):
    for r in worker_pool(2).run(run_intrusive, dict(ulysses_degree=2), True):
        assert r["error"] == "forward failed"
        assert r["shard"].shape == (2, 4, 4)  # it was inside the forward
        assert not r["ambient_after"]


def run_after_setup(length: int):
    rank = torch.distributed.get_rank()
    config = SequenceParallelConfig(ulysses_degree=2)
    config.setup(rank, 2, torch.device("cpu"))
    try:
        x = torch.arange(float(length)).view(1, length, 1)
        out = {"rank": config.get_rank(), "world": config.get_world_size()}
        out["loose"] = sp_shard(x, dim=1, validate=False)
        out["loose_gathered"] = sp_gather(out["loose"], dim=1)
        padded, pad = sp_shard_with_padding(x, dim=1, pad_value=-1.0)
        out["padded"], out["pad"] = padded, pad
        out["padded_gathered"] = sp_gather(padded, dim=1)
        try:
            sp_shard(x, dim=1)
        except ValueError as exc:
            out["strict_error"] = str(exc)
        validator = get_sharding_validator()
        with validator.track():
            h = validator.shard(x[:, : 2 * (length // 2)], "h", dim=1)
        out["validator_shard"] = h
        try:
            validator.validate()
        except ValueError as exc:
            out["validator_error"] = str(exc)
        return out
    finally:
        from ithaca.parallel.sharding import set_setup_state

        set_setup_state(None)
        config.state.destroy()


def test_helpers_after_setup_handle_indivisible_lengths(worker_pool):
    results = worker_pool(2).run(run_after_setup, 5)
    x = torch.arange(5.0).view(1, 5, 1)
    assert [r["loose"].shape[1] for r in results] == [3, 2]  # tensor_split: 3 + 2
    for r in results:
        assert r["world"] == 2
        assert torch.equal(r["loose_gathered"], x)  # no hang, nothing lost
        assert r["pad"] == 1 and r["padded"].shape == (1, 3, 1)
        assert torch.equal(r["padded_gathered"][:, :5], x)
        assert r["padded_gathered"][0, 5, 0].item() == -1.0
        assert "size 5 over 2" in r["strict_error"]
        assert torch.equal(r["validator_shard"], x[:, :4].chunk(2, dim=1)[r["rank"]])
        assert "never gathered: ['h']" in r["validator_error"]


def run_ring_attention_bf16(convert_to_fp32: bool):
    """bf16 attention of 64 tokens under Ring 2, through ``SequenceParallelConfig.apply``."""
    rank = torch.distributed.get_rank()
    config = SequenceParallelConfig(ring_degree=2, convert_to_fp32=convert_to_fp32)
    config.setup(rank, 2, "cpu")
    try:
        runtime = config.apply(toy.TokenMixer())
        q, k, v = (sp_shard(t, dim=1) for t in attention_inputs())  # (1, 32, 4, 16) each
        out, _ = runtime.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        runtime.remove()
        return sp_gather(out, dim=1).float(), runtime.attention.accum_dtype
    finally:
        from ithaca.parallel.sharding import set_setup_state

        set_setup_state(None)
        config.state.destroy()


def attention_inputs():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 64, 4, 16, generator=g) * 2 for _ in range(3)]


def test_convert_to_fp32_takes_effect(worker_pool):
    pool = worker_pool(2)
    q, k, v = (t.bfloat16().double().transpose(1, 2) for t in attention_inputs())
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    fp32, dtype32 = pool.run(run_ring_attention_bf16, True)[0]
    bf16, dtype16 = pool.run(run_ring_attention_bf16, False)[0]
    assert dtype32 == torch.float32 and dtype16 is None
    err32 = (fp32.double() - reference).abs()
    err16 = (bf16.double() - reference).abs()
    assert not torch.equal(fp32, bf16)  # the setting changes the merge arithmetic
    # bf16 inputs and a bf16 kernel either way; the float32 merge is the more accurate
    assert err32.max().item() <= 0.05 and err16.max().item() <= 0.05
    assert err32.mean().item() < 0.9 * err16.mean().item(), (err32.mean(), err16.mean())
