"""The offline Python API: the serving engine without HTTP.

    from ithaca.api import Ithaca
    from ithaca.config import ParallelConfig

    with Ithaca("Qwen/Qwen-Image", parallel=ParallelConfig(ulysses_degree=2)) as gen:
        result = gen.generate("a red fox in snow", width=512, height=512, seed=0)
        result.images[0].save("fox.png")

One rank runs in this process; more ranks run as a torchrun worker group launched
(and supervised) exactly as ``ithaca serve`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ithaca.config import CacheConfig, ParallelConfig, ServerConfig
from ithaca.engine.engine import Engine, build_engine
from ithaca.types import GenerationParams, GenerationResult, open_image

_FIELDS = {f.name for f in dataclasses.fields(GenerationParams)}


def make_params(prompt: str | dict | GenerationParams, **sampling: Any) -> GenerationParams:
    """``prompt`` or ``{"prompt": ..., "images": [...]}`` plus sampling fields -> params."""
    if isinstance(prompt, GenerationParams):
        return dataclasses.replace(prompt, **sampling)
    fields = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
    fields.update(sampling)
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown generation parameter(s) {unknown}; known: {sorted(_FIELDS)}")
    images = fields.get("images") or []
    fields["images"] = [open_image(i) if isinstance(i, str) else i for i in images]
    return GenerationParams(**fields)


class Ithaca:
    """An engine over one pipeline (``model=None``: the embedded default model)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        parallel: ParallelConfig | None = None,
        cache: CacheConfig | None = None,
        dtype: str | None = None,
        executor: str | None = None,
        startup_timeout_s: float = 600.0,
    ):
        parallel = parallel or ParallelConfig()
        if executor is None:
            executor = "inprocess" if parallel.world_size == 1 else "torchrun"
        server = ServerConfig(
            model=model,
            dtype=dtype,
            executor=executor,
            max_batch_size=1,
            startup_timeout_s=startup_timeout_s,
        )
        self.engine: Engine = build_engine(server, parallel, cache or CacheConfig())
        self.engine.start(wait=True)

    def generate(
        self, prompt: str | dict | GenerationParams, *, on_progress=None, **sampling: Any
    ) -> GenerationResult:
        """One request; ``result.images`` (PIL) or ``result.frames`` ``(F, H, W, 3)``.
        ``on_progress(step, total, previews)`` is called after each denoising step."""
        return self.engine.submit(make_params(prompt, **sampling), on_progress).future.result()

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> Ithaca:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
