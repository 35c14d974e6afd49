"""comm.broadcast_nested: a request's conditioning reaches every rank in one packed
device broadcast, every tensor bit-identical, the plain values as they were."""

import torch

from ithaca.config import ParallelConfig
from ithaca.parallel import comm
from ithaca.testing.distributed import parallel_state


def run_broadcast():
    with parallel_state(ParallelConfig(ulysses_degree=2)) as state:
        g = torch.Generator().manual_seed(3)
        sent = [{"positive": {"embeds": torch.randn(1, 7, 5, generator=g).bfloat16(),
                              "mask": torch.tensor([[True, False, True]])},
                 "negative": (torch.randn(3, generator=g), torch.tensor(2.5)), "seed": 11,
                 "empty": torch.zeros(0, 4, dtype=torch.int64)}]  # fmt: skip
        got = comm.broadcast_nested(sent if state.replica.rank == 0 else None, state.replica)
        return got, sent


def test_conditioning_arrives_bit_identical_on_every_rank(worker_pool):
    for got, sent in worker_pool(2).run(run_broadcast):
        g, s = got[0], sent[0]
        assert g["seed"] == 11 and isinstance(g["negative"], tuple)
        for a, b in [(g["positive"]["embeds"], s["positive"]["embeds"]),
                     (g["positive"]["mask"], s["positive"]["mask"]),
                     (g["negative"][0], s["negative"][0]), (g["negative"][1], s["negative"][1]),
                     (g["empty"], s["empty"])]:  # fmt: skip
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
