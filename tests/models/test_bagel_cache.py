"""TeaCache and Cache-DiT over Bagel's decoder layers, on the golden fixture cases.

Threshold 0 equals no cache byte for byte; with the cache on, every fixture case (its
own prompt, size, CFG settings and schedule) reports hits, keeps one cache state per CFG
branch, and stays at >= 28 dB PSNR of the uncached image (measured 31.5-39 dB; numbers
in docs/models.md). One process, CPU, the tiny random-weight checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models._bagel_golden import CHECKPOINT, FP32_CASES, golden_request, psnr, requires_golden

pytestmark = requires_golden
ON = {
    "tea_cache": {"rel_l1_thresh": 0.3},
    "cache_dit": {"residual_diff_threshold": 0.3, "max_warmup_steps": 1},
}
OFF = {"tea_cache": {"rel_l1_thresh": 0.0}, "cache_dit": {"residual_diff_threshold": 0.0}}


_PLAIN: dict[str, np.ndarray] = {}


def _plain(pipe, name: str) -> np.ndarray:
    if name not in _PLAIN:
        _PLAIN[name] = _run(pipe, name)[0]
    return _PLAIN[name]


@pytest.fixture(scope="module")
def pipe():
    from ithaca.models.registry import load_pipeline
    from ithaca.parallel import ParallelState

    return load_pipeline(CHECKPOINT, ParallelState.single())


def _run(pipe, name: str, backend=None, options=None):
    params = golden_request(name, cache_backend=backend, cache_config=options)
    result = pipe.generate([params])[0]
    return np.array(result.images[0]), result.metadata


@pytest.mark.parametrize("backend", sorted(ON))
def test_threshold_zero_is_no_cache_exactly(pipe, backend):
    name = "c_edit_112x224"  # three branches
    plain = _plain(pipe, name)
    cached, meta = _run(pipe, name, backend, OFF[backend])
    assert np.array_equal(plain, cached)
    assert meta["cache"]["cached_steps"] == 0 and meta["cache"]["computed_steps"] == 12


@pytest.mark.parametrize("backend", sorted(ON))
@pytest.mark.parametrize("name", FP32_CASES)
def test_cache_hits_within_psnr(pipe, backend, name):
    plain = _plain(pipe, name)
    cached, meta = _run(pipe, name, backend, ON[backend])
    assert meta["cache"]["cached_steps"] >= 1
    branches = {branch for _, branch, _ in pipe.step_cache.stats.pattern}
    assert branches == ({0, 1, 2} if name.startswith("c_") else {0, 1})  # state per branch
    assert psnr(torch.from_numpy(cached), torch.from_numpy(plain)) >= 28.0
