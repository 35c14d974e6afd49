"""Step-level batching on 2 gloo ranks (Ulysses 2, and CFG-parallel 2): the returning
rank alone decides who joins; the decision is broadcast, so every rank runs the same
batch steps and the images equal the 1-rank step batch within 1/255."""

import numpy as np
import pytest

from tests.models.harness import stepwise_join

BATCH = [
    dict(prompt="a red cat", negative_prompt="blurry", width=32, height=32,
         num_inference_steps=2, seed=1, request_id="a"),
]  # fmt: skip
JOINER = dict(prompt="a green house", negative_prompt="blurry", width=32, height=32,
              num_inference_steps=3, true_cfg_scale=2.5, seed=3, request_id="c")  # fmt: skip


@pytest.fixture(scope="module")
def one_rank(tiny_checkpoints):
    return stepwise_join({}, tiny_checkpoints["t2i"], BATCH, JOINER)


@pytest.mark.parametrize("layout", [{"ulysses_degree": 2}, {"cfg_parallel_size": 2}],
                         ids=["ulysses2", "cfg2"])  # fmt: skip
def test_joins_agree_across_ranks(worker_pool, tiny_checkpoints, one_rank, layout):
    ranks = worker_pool(2).run(stepwise_join, layout, tiny_checkpoints["t2i"], BATCH, JOINER)
    images, _, _ = one_rank
    for _, joined, _ in ranks:  # every rank ran c from batch step 1, a from 0
        assert joined == {"a": 0, "c": 1}
    assert ranks[0][2] == [1, 2, 3, 4] and ranks[1][2] == []  # only rank 0 was asked
    for rid, ours in ranks[0][0].items():
        for x, y in zip(ours, images[rid], strict=True):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1, rid
    assert ranks[1][0] == {"a": [], "c": []}  # images only on the returning rank
