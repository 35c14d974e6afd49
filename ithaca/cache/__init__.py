"""Step caches: skip transformer work across denoising steps, under every layout.

``build_cache(backend, options, transformer, adapter, state, padding)`` installs
``"tea_cache"`` (:class:`TeaCache`) or ``"cache_dit"`` (:class:`DBCache`, with
TaylorSeer and SCM) on a transformer's blocks. The denoising loop calls
``cache.begin(num_steps)`` per request and wraps each transformer call in
``with cache.step(i, branch):``; ``cache.stats`` reports what was skipped.
"""

from __future__ import annotations

from ithaca.cache.base import BlockCacheAdapter, CacheGroup, CacheStats, StepCache
from ithaca.cache.calibrate import TeaCacheCalibrator
from ithaca.cache.dbcache import CACHE_DIT_OPTIONS, DBCache, TaylorSeer, scm_mask
from ithaca.cache.teacache import (
    FLUX_COEFFICIENTS,
    TEACACHE_OPTIONS,
    TeaCache,
    checkpoint_coefficients,
    fit_coefficients,
)

BACKENDS = {"tea_cache": (TeaCache, TEACACHE_OPTIONS), "cache_dit": (DBCache, CACHE_DIT_OPTIONS)}
# Not for users: the calibration probe that `ithaca calibrate-teacache` installs.
_INTERNAL = {TeaCacheCalibrator.name: TeaCacheCalibrator}


def validate_cache_options(backend: str | None, options: dict | None) -> None:
    """Raise ``ValueError`` for an unknown backend or option (before any work)."""
    if backend is None:
        if options:
            raise ValueError(f"cache_config ({options!r}) given without a cache_backend")
        return
    if backend not in BACKENDS:
        raise ValueError(f"cache_backend ({backend!r}) must be one of {sorted(BACKENDS)}")
    unknown = set(options or {}) - BACKENDS[backend][1]
    if unknown:
        raise ValueError(
            f"cache_config has unknown keys {sorted(unknown)} for {backend}; "
            f"valid keys: {sorted(BACKENDS[backend][1])}"
        )


def build_cache(backend, options, transformer, adapter, state, padding=None) -> StepCache:
    if backend in _INTERNAL:
        return _INTERNAL[backend](transformer, adapter, state, padding)
    validate_cache_options(backend, options)
    cls = BACKENDS[backend][0]
    return cls(transformer, adapter, state, padding, **(options or {}))


__all__ = [
    "BACKENDS",
    "FLUX_COEFFICIENTS",
    "BlockCacheAdapter",
    "CacheGroup",
    "CacheStats",
    "DBCache",
    "StepCache",
    "TaylorSeer",
    "TeaCache",
    "build_cache",
    "checkpoint_coefficients",
    "fit_coefficients",
    "scm_mask",
    "validate_cache_options",
]
