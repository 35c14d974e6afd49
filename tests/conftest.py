"""Shared fixtures. Multi-rank tests borrow a pool of spawned gloo ranks per world size,
started once per session (see ithaca.testing.distributed)."""

import pytest
import torch

from ithaca.testing.distributed import WorkerPool


@pytest.fixture(scope="session")
def worker_pool():
    """``worker_pool(n)`` -> a live :class:`WorkerPool` of n ranks (restarted if broken)."""
    pools: dict[int, WorkerPool] = {}

    def get(world_size: int) -> WorkerPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive:
            pool = pools[world_size] = WorkerPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
