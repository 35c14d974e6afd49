"""``_sp_plan`` hooks on a toy transformer, and plan / validator rejections.

Pyramid: plan validation and ShardingValidator in-process; toy-model parity on 2- and
4-rank gloo groups (fp32, max abs error <= 1e-5 against the unsharded model) on an
image sequence of prime length, so every layout pads (auto_pad).
"""

import pytest
import torch

from ithaca.config import ParallelConfig
from ithaca.parallel import (
    ParallelState,
    SequenceParallelInput,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    ShardingValidator,
    apply_sequence_parallel,
    validate_sp_plan,
)
from ithaca.testing.distributed import parallel_state
from tests.parallel import toy

IMAGE_LEN = 13  # prime: does not divide by 2 or 4


def run_toy(layout: dict, plan_name: str, image_len: int = IMAGE_LEN):
    with parallel_state(ParallelConfig(**layout)) as state:
        model = toy.make_model()
        runtime = apply_sequence_parallel(model, toy.PLANS[plan_name], state)
        for block in model.blocks:
            block.attn = runtime.attention
        with torch.no_grad():
            out = model(*toy.make_inputs(image_len))
        runtime.remove()
        return out


def run_mixer(layout: dict):
    with parallel_state(ParallelConfig(**layout)) as state:
        torch.manual_seed(0)
        model = toy.TokenMixer()
        runtime = apply_sequence_parallel(model, state=state)  # the class's own _sp_plan
        model.attn = runtime.attention
        with torch.no_grad():
            return model(toy.make_inputs(IMAGE_LEN)[0])


def run_expecting_error(layout: dict, plan: dict):
    """Run the toy model under a bad plan; return the error every rank raised."""
    with parallel_state(ParallelConfig(**layout)) as state:
        model = toy.make_model()
        runtime = apply_sequence_parallel(model, plan, state)
        for block in model.blocks:
            block.attn = runtime.attention
        try:
            with torch.no_grad():
                model(*toy.make_inputs(IMAGE_LEN))
        except ValueError as exc:
            return str(exc)
        return None


def unsharded_toy(image_len: int = IMAGE_LEN):
    with torch.no_grad():
        return toy.make_model()(*toy.make_inputs(image_len))


def assert_close(results, reference, tol=1e-5):
    for rank, out in enumerate(results):
        assert out.shape == reference.shape, (rank, out.shape)
        err = (out - reference).abs().max().item()
        assert err <= tol, f"rank {rank}: differs by {err:.2e}"


LAYOUTS = {
    "ulysses2": (2, dict(ulysses_degree=2)),
    "ring2": (2, dict(ring_degree=2)),
    "hybrid2x2": (4, dict(ulysses_degree=2, ring_degree=2)),
    "ring4": (4, dict(ring_degree=4)),
}


@pytest.mark.parametrize("plan", toy.PLANS)
@pytest.mark.parametrize("world,layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_toy_transformer_matches_unsharded(worker_pool, world, layout, plan):
    assert_close(worker_pool(world).run(run_toy, layout, plan), unsharded_toy())


def test_divisible_sequence_needs_no_padding(worker_pool):
    assert_close(
        worker_pool(2).run(run_toy, dict(ulysses_degree=2), "block", 12), unsharded_toy(12)
    )


@pytest.mark.parametrize("layout", [dict(ulysses_degree=2), dict(ring_degree=2)])
def test_root_key_shards_inputs_and_gathers_outputs(worker_pool, layout):
    torch.manual_seed(0)
    with torch.no_grad():
        reference = toy.TokenMixer()(toy.make_inputs(IMAGE_LEN)[0])
    assert_close(worker_pool(2).run(run_mixer, layout), reference)


def test_hooks_reject_what_they_should_at_run_time(worker_pool):
    pool = worker_pool(2)
    layout = dict(ulysses_degree=2)
    no_gather = {k: v for k, v in toy.PLAN_BLOCK.items() if k != "outputs.main"}
    msg = pool.run(run_expecting_error, layout, no_gather)
    assert all("gathered nothing" in m for m in msg)

    # A spec whose tensor has another rank is skipped with a warning; the forward
    # completes, and the runtime's check after it refuses the result.
    wrong_dims = dict(toy.PLAN_BLOCK)
    wrong_dims["blocks.*"] = {
        **toy.PLAN_BLOCK["blocks.*"],
        "text_mask": SequenceParallelInput(1, expected_dims=3),
    }
    msg = pool.run(run_expecting_error, layout, wrong_dims)
    assert all("unexpected tensor shapes" in m and "blocks.0.text_mask" in m for m in msg)

    no_pad = dict(toy.PLAN_BLOCK)
    no_pad["blocks.0"] = {"hidden_states": SequenceParallelInput(1, expected_dims=3)}
    no_pad["rope"] = {i: SequenceParallelPartialInput(0, "txt_ids", 2, True) for i in (0, 1)}
    msg = pool.run(run_expecting_error, layout, no_pad)
    assert all("does not divide" in m and "auto_pad" in m for m in msg)


BAD_PLANS = {
    "not_a_dict": ([], "must be a dict"),
    "empty_entry": ({"blocks.0": {}}, "non-empty dict"),
    "star_in_middle": ({"blocks.*.attn": SequenceParallelOutput(1)}, "'*' may only"),
    "bare_star": ({"*": SequenceParallelOutput(1)}, "'*' may only"),
    "empty_component": ({"blocks..0": SequenceParallelOutput(1)}, "empty path component"),
    "split_output_by_name": (
        {"rope": {"x": SequenceParallelInput(1, split_output=True)}},
        "must be an output index",
    ),
    "input_by_index": ({"rope": {0: SequenceParallelInput(1)}}, "needs split_output=True"),
    "gather_by_name": ({"proj": {"x": SequenceParallelOutput(1)}}, "keyed by output index"),
    "dim_out_of_range": (
        {"b": {"x": SequenceParallelInput(3, expected_dims=3)}},
        "out of range",
    ),
    "bad_text_len": (
        {"rope": {0: SequenceParallelPartialInput(0, -1, split_output=True)}},
        "text_len_source",
    ),
    "not_a_spec": ({"b": {"x": 1}}, "not a sequence-parallel spec"),
}


@pytest.mark.parametrize("plan,message", BAD_PLANS.values(), ids=BAD_PLANS.keys())
def test_validate_sp_plan_rejects(plan, message):
    with pytest.raises(ValueError, match=message):
        validate_sp_plan(plan)


def test_validate_sp_plan_accepts_the_toy_plans():
    for plan in toy.PLANS.values():
        validate_sp_plan(plan)
    validate_sp_plan(toy.TokenMixer._sp_plan)


def test_apply_rejects_unknown_modules_and_parameters():
    model, state = toy.make_model(), ParallelState.single()
    with pytest.raises(ValueError, match="names no submodule"):
        apply_sequence_parallel(model, {"nope": SequenceParallelOutput(1)}, state)
    with pytest.raises(ValueError, match="names parameter 'hidden'"):
        apply_sequence_parallel(model, {"blocks.0": {"hidden": SequenceParallelInput(1)}}, state)
    with pytest.raises(ValueError, match="not a module list"):
        apply_sequence_parallel(model, {"norm.*": SequenceParallelOutput(1)}, state)
    with pytest.raises(ValueError, match="declares no _sp_plan"):
        apply_sequence_parallel(model, state=state)


def test_sharding_validator_pairs_shards_with_gathers():
    validator = ShardingValidator(ParallelState.single())
    x = torch.randn(2, 8, 4)
    with validator.track():
        h = validator.shard(x, "hidden_states", dim=1)
        validator.shard(x, "rope", dim=1)
        validator.gather(h, "hidden_states", dim=1)
    with pytest.raises(ValueError, match=r"never gathered: \['rope'\]"):
        validator.validate()

    with validator.track():
        validator.gather(validator.shard(x, "hidden_states", dim=1), "hidden_states", dim=1)
    validator.validate()

    with validator.track():
        validator.record_skip("blocks.0.x: expected a 3-d tensor")
    with pytest.raises(ValueError, match="unexpected shapes"):
        validator.validate()
