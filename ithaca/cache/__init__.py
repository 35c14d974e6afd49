"""Step caches (TeaCache, block caching, TaylorSeer) with per-branch state."""
