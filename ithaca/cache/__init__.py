"""Step caches: skip transformer work across denoising steps, under every layout.

``build_cache(config, transformer, adapter, state, padding)`` installs
``"tea_cache"`` (:class:`TeaCache`) or ``"cache_dit"`` (:class:`DBCache`, with
TaylorSeer and SCM) on a transformer's blocks. The denoising loop calls
``cache.begin(num_steps)`` per request and wraps each transformer call in
``with cache.step(i, branch):``; ``cache.stats`` reports what was skipped.
"""

from __future__ import annotations

from ithaca.cache.base import BlockCacheAdapter, CacheGroup, CacheStats, Rows, StepCache
from ithaca.cache.dbcache import DBCache, TaylorSeer, scm_mask
from ithaca.cache.teacache import (
    FLUX_COEFFICIENTS,
    TeaCache,
    checkpoint_coefficients,
    fit_coefficients,
)
from ithaca.config import CACHE_OPTIONS, CacheConfig

BACKENDS = {"tea_cache": TeaCache, "cache_dit": DBCache}
assert set(BACKENDS) == set(CACHE_OPTIONS), "ithaca.config.CACHE_OPTIONS lists the backends"


def build_cache(config: CacheConfig, transformer, adapter, state, padding=None) -> StepCache:
    """Install ``config``'s cache (already validated: a :class:`CacheConfig`)."""
    return BACKENDS[config.backend](transformer, adapter, state, padding, **config.as_dict())


__all__ = [
    "BACKENDS",
    "FLUX_COEFFICIENTS",
    "BlockCacheAdapter",
    "CacheGroup",
    "CacheStats",
    "DBCache",
    "Rows",
    "StepCache",
    "TaylorSeer",
    "TeaCache",
    "build_cache",
    "checkpoint_coefficients",
    "fit_coefficients",
    "scm_mask",
]
