"""ParallelConfig validation, the rank map, and ParallelState on real groups.

Pyramid: configs and the rank map in-process; state axes on 4- and 8-rank gloo groups.
"""

import pytest

import ithaca
from ithaca.config import ParallelConfig
from ithaca.parallel import ParallelState, SequenceParallelConfig
from ithaca.parallel.state import layout_groups
from ithaca.testing.distributed import parallel_state


def test_degrees_multiply_into_the_world_size():
    config = ParallelConfig(
        ulysses_degree=2, ring_degree=2, cfg_parallel_size=2, data_parallel_size=3
    )
    assert config.sequence_parallel_size == 4
    assert config.world_size == 24
    assert ithaca.DiffusionParallelConfig is ithaca.ParallelConfig


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ulysses_degree=0), r"ulysses_degree \(0\) must be a positive integer"),
        (dict(ring_degree=-2), r"ring_degree \(-2\) must be a positive integer"),
        (dict(ring_degree=1.5), r"ring_degree \(1.5\)"),
        (dict(cfg_parallel_size=3), r"cfg_parallel_size \(3\) must be 1 or 2"),
        (dict(data_parallel_size=0), r"data_parallel_size \(0\)"),
    ],
)
def test_invalid_values_name_the_field_and_the_number(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_heads_that_do_not_divide_list_the_valid_degrees():
    with pytest.raises(
        ValueError,
        match=r"ulysses_degree \(4\) must divide num_attention_heads \(6\); "
        r"valid degrees: \[1, 2, 3, 6\]",
    ):
        ParallelConfig(ulysses_degree=4).validate_heads(6)
    ParallelConfig(ulysses_degree=3).validate_heads(24)


def test_rank_map_of_the_documented_eight_rank_example():
    groups = layout_groups(ParallelConfig(ulysses_degree=2, ring_degree=2, cfg_parallel_size=2))
    assert groups["ulysses"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups["ring"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups["sp"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert groups["cfg"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups["replica"] == [tuple(range(8))]


def test_tensor_parallel_is_the_innermost_axis():
    """tp 2 x ulysses 2 x cfg 2: tp ranks adjacent, Ulysses over the ranks of one tp index."""
    groups = layout_groups(
        ParallelConfig(tensor_parallel_size=2, ulysses_degree=2, cfg_parallel_size=2)
    )
    assert groups["tp"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups["ulysses"] == groups["sp"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups["cfg"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups["replica"] == [tuple(range(8))]
    assert ParallelState.single().tp.size == 1


def test_data_parallel_is_the_outermost_axis():
    groups = layout_groups(ParallelConfig(ulysses_degree=2, data_parallel_size=2))
    assert groups["dp"] == [(0, 2), (1, 3)]
    assert groups["replica"] == [(0, 1), (2, 3)]


def test_single_process_state_has_trivial_axes():
    state = ParallelState.single()
    assert (state.sp.size, state.ring.size, state.cfg.size) == (1, 1, 1)
    with pytest.raises(ValueError, match="world size 1"):
        ParallelState.single(ParallelConfig(ulysses_degree=2))
    sp = SequenceParallelConfig()
    assert not sp.is_initialized()
    with pytest.raises(RuntimeError, match="setup"):
        sp.get_rank()


def describe_state(layout: dict):
    with parallel_state(ParallelConfig(**layout)) as state:
        sp = SequenceParallelConfig(
            ulysses_degree=layout.get("ulysses_degree", 1), ring_degree=layout.get("ring_degree", 1)
        )
        sp.setup(state.rank, state.world_size, state.device, state=state)
        return {
            "rank": state.rank,
            "axes": {
                a: (getattr(state, a).rank, getattr(state, a).ranks)
                for a in ("dp", "cfg", "ring", "ulysses", "sp", "replica")
            },
            "seed_api": (
                sp.get_rank(),
                sp.get_world_size(),
                sp.get_ulysses_rank(),
                sp.get_ulysses_world_size(),
                sp.get_ring_rank(),
                sp.get_ring_world_size(),
            ),
        }


@pytest.mark.serial  # 8 ranks on 2 cores: alone, not beside an xdist worker
def test_state_on_eight_ranks_follows_the_rank_map(worker_pool):
    layout = dict(ulysses_degree=2, ring_degree=2, cfg_parallel_size=2)
    for rank, info in enumerate(worker_pool(8).run(describe_state, layout)):
        u, r, c = rank % 2, (rank // 2) % 2, rank // 4
        assert info["rank"] == rank
        assert info["axes"]["ulysses"] == (u, (rank - u, rank - u + 1))
        assert info["axes"]["ring"] == (r, (rank - 2 * r, rank - 2 * r + 2))
        assert info["axes"]["cfg"] == (c, (rank % 4, rank % 4 + 4))
        assert info["axes"]["sp"] == (2 * r + u, tuple(range(4 * c, 4 * c + 4)))
        assert info["seed_api"] == (2 * r + u, 4, u, 2, r, 2)


def build_with_wrong_world():
    try:
        ParallelState.build(ParallelConfig(ulysses_degree=4))
    except ValueError as exc:
        return str(exc)
    return None


def test_state_rejects_a_config_that_does_not_fill_the_world(worker_pool):
    for message in worker_pool(2).run(build_with_wrong_world):
        assert message and "world size (2) must equal" in message
