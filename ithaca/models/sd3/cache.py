"""How SD3 / SD3.5's blocks look to the step caches (``ithaca.cache``).

One stack of MMDiT ``JointTransformerBlock`` s, each taking this rank's image tokens and
the whole text and returning ``(text, image)``; the last block is ``context_pre_only``
and returns ``(None, image)``, which a skipped step does not need either (the forward
only reads the image after the stack). TeaCache probes block 0's ``norm1`` as on FLUX.1
(``AdaLayerNormZero``, or SD3.5-medium's ``AdaLayerNormZeroX`` with its second
attention); DBCache remembers the middle's text residual for the last ``Bn`` blocks.

TeaCache coefficients: none are published for SD3 / SD3.5; the default is FLUX.1's fit
(the closest published family: the same MMDiT double-stream block and the same probe),
unless the checkpoint's ``ithaca.json`` carries its own (``ithaca calibrate-teacache``).
"""

from __future__ import annotations

from ithaca.cache import BlockCacheAdapter
from ithaca.models.flux import cache as flux_cache


def cache_adapter(model_dir: str | None = None) -> BlockCacheAdapter:
    return flux_cache.cache_adapter(model_dir, blocks="transformer_blocks")
