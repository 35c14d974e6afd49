"""The HSDP mesh is rebuilt with the rest of a worker group's process groups.

Pyramid: one 2-rank gloo run (no model checkpoint: a 3-block MLP sharded by
``apply_hsdp_to_model`` over :class:`HSDPMesh`). The worker loop's failure path, as in
``tests/engine/test_worker_oom.py``: rank 1 fails inside block 0 while rank 0 goes on
to block 1's all-gather; rank 1's ``abort_groups`` must release rank 0 at once (the
mesh's groups are the state's), and after ``rebuild_groups`` the same sharded model
runs on fresh groups and gives the unsharded output bit for bit (fp32, the same
all-gathered weights).
"""

import time
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from ithaca.config import ParallelConfig
from ithaca.parallel.hsdp import HSDPInferenceConfig, HSDPMesh, parameter_bytes
from ithaca.testing.distributed import parallel_state


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def _fail_then_rebuild() -> dict:
    config = ParallelConfig(ulysses_degree=2, use_hsdp=True, collective_timeout_s=30.0)
    with parallel_state(config) as state:
        model = Blocks()
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = model(x)
        full = parameter_bytes(model)
        hsdp = HSDPMesh(HSDPInferenceConfig.from_parallel(config), state)
        hsdp.shard(model)
        old_group = weakref.ref(hsdp.mesh.get_group("shard"))  # a reference would keep it open
        with torch.no_grad():
            first = model(x)

        def fail(*_):  # rank 1 only, inside block 0 (its weights gathered)
            raise RuntimeError("injected failure")

        hook = model.blocks[0].register_forward_pre_hook(fail) if state.rank == 1 else None
        started, error = time.monotonic(), None
        try:
            with torch.no_grad():
                model(x)
        except RuntimeError as exc:
            error = str(exc)
        # As the worker loop: outside the except block (its traceback holds the groups).
        state.abort_groups()  # rank 1 releases rank 0, waiting in block 1's all-gather
        released = time.monotonic() - started
        if hook is not None:
            hook.remove()
        dist.barrier()  # the control group (gloo default) still agrees
        state.rebuild_groups()
        with torch.no_grad():
            again = model(x)
        return {
            "error": error,
            "released_s": released,
            "builds": hsdp.builds,
            "fresh": old_group() is None and hsdp.mesh.get_group("shard").size() == 2,
            "first": torch.equal(first, want),
            "again": torch.equal(again, want),
            "bytes": (parameter_bytes(model), full),
        }


def test_rebuild_groups_rebuilds_the_hsdp_mesh(worker_pool):
    results = worker_pool(2).run(_fail_then_rebuild)
    assert "injected failure" in results[1]["error"]
    assert results[0]["error"] is not None  # rank 0's all-gather failed, it did not hang
    assert results[0]["released_s"] < 15.0, results[0]["released_s"]  # not the 30 s timeout
    for r in results:
        assert r["builds"] == 2 and r["fresh"], r
        assert r["first"] and r["again"], r
        held, full = r["bytes"]
        assert held == full // 2, r["bytes"]  # still 1/2 of the weights per rank


def test_hsdp_with_offload_or_tensor_parallel_is_refused_naming_both_fields():
    """One rule in ParallelConfig (every family, before anything loads): the transformer
    is either sharded by HSDP, or split by TP, or offloaded."""
    with pytest.raises(ValueError, match=r"use_hsdp with tensor_parallel_size \(2\)"):
        ParallelConfig(ulysses_degree=2, tensor_parallel_size=2, use_hsdp=True)
    for flag in ("cpu_offload", "layerwise_offload"):
        with pytest.raises(ValueError, match=rf"use_hsdp with .*{flag} \(True\)"):
            ParallelConfig(ulysses_degree=2, use_hsdp=True, **{flag: True})
    from ithaca.cli import _parallel, build_parser

    args = build_parser().parse_args(["serve", "m", "--usp", "2", "--use-hsdp",
                                      "--enable-cpu-offload"])  # fmt: skip
    with pytest.raises(ValueError, match=r"cpu_offload \(True\)"):
        _parallel(args)
    # Encoder placements are not the transformer's: they combine with HSDP.
    config = ParallelConfig(ulysses_degree=2, use_hsdp=True, text_encoder_placement="offload")
    assert config.placement("text_encoder") == "offload"
