"""Run the app under uvicorn: drain on SIGTERM, exit non-zero on a fatal worker failure.

SIGTERM/SIGINT: the engine stops taking requests (new ones get 503, ``/ready`` turns
503), uvicorn stops accepting connections and gives open requests
``drain_timeout_s`` to finish, then the lifespan shuts the worker groups down
(bounded). With ``on_worker_failure="exit"`` a dead group ends the process with
exit code 1 after the same bounded shutdown.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

import uvicorn

from ithaca.config import CacheConfig, ParallelConfig, ServerConfig
from ithaca.engine.engine import build_engine
from ithaca.server.app import create_app
from ithaca.server.state import ServedModel

log = logging.getLogger("ithaca.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engines):
        super().__init__(config)
        self.engines = engines
        self.exit_code = 0
        self.drain_timeout_s = max(0.0, float(config.timeout_graceful_shutdown or 0) - 1.0)

    def handle_exit(self, sig, frame) -> None:
        for engine in self.engines:
            if engine.draining:
                continue
            engine.begin_drain()
            # At the end of the drain, requests still running get the documented 503 JSON
            # (before uvicorn's own timeout, one second later, would cancel them bare).
            timer = threading.Timer(self.drain_timeout_s, engine.abort_running)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)

    def fatal(self, reason: str) -> None:
        log.error("fatal: %s; shutting down", reason)
        self.exit_code = 1
        self.should_exit = True


@dataclass(frozen=True)
class ModelEntry:
    """One model of a multi-model server: its checkpoint, name and parallel layout."""

    model: str | None
    """Checkpoint / hub id; ``None`` for the embedded default image model."""
    name: str | None
    """Name clients pass as ``model``; ``None``: the checkpoint as given."""
    parallel: ParallelConfig
    loras: tuple[tuple[str, str, float], ...] | None = None
    """``--lora`` adapters ``(name, path, scale)`` for this model; None: the server's
    ``loras`` for the first model, none for the others."""


DEFAULT_VIDEO_NAME = "ithaca-default-video"


def default_entries(parallel: ParallelConfig, nnodes: int = 1) -> list[ModelEntry]:
    """``ithaca serve`` with no model: the default image model with the given layout, then
    the default video model on one rank of its own (it is tiny: 80 tokens a clip; the
    layout flags are the image model's). On several nodes only the image model: a worker
    node serves one model's ranks."""
    from ithaca.engine.catalog import default_models

    entries = [ModelEntry(None, None, parallel)]
    if nnodes > 1:
        return entries
    video = ParallelConfig(
        attention_backend=parallel.attention_backend,
        collective_timeout_s=parallel.collective_timeout_s,
    )
    entries += [ModelEntry(m, DEFAULT_VIDEO_NAME, video) for m in default_models()[1:]]
    return entries


def build_models(server: ServerConfig, cache, entries: list[ModelEntry], on_fatal=None):
    """One engine (its own worker groups, layout and devices) per model."""
    from ithaca.engine.catalog import model_info
    from ithaca.engine.executor import default_model_path

    served, names, offset = [], set(), 0
    for i, entry in enumerate(entries):
        port = None if server.master_port is None else server.master_port + 100 * i
        config = dataclasses.replace(
            server,
            model=entry.model,
            served_model_name=entry.name or (server.served_model_name if i == 0 else None),
            master_port=port,
            loras=entry.loras if entry.loras is not None else server.loras if i == 0 else (),
        )
        if config.model_name in names:
            raise ValueError(f"two models are named '{config.model_name}': give each a name=")
        names.add(config.model_name)
        info = model_info(entry.model or default_model_path())
        engine = build_engine(
            config, entry.parallel, cache, on_fatal=on_fatal, device_offset=offset
        )
        offset += entry.parallel.world_size
        log.info(
            "model '%s': %s, layout %s", config.model_name, "/".join(info.tasks), entry.parallel
        )
        served.append(ServedModel(config.model_name, engine, info, entry.model))
    return served


def serve(
    server: ServerConfig,
    parallel: ParallelConfig,
    cache: CacheConfig | None = None,
    models: list[ModelEntry] | None = None,
) -> int:
    """Serve until SIGTERM (returns 0) or a fatal worker failure (returns 1).

    ``models``: several models, each with its own engine; default: ``server.model`` with
    ``parallel``."""
    holder: dict = {}
    entries = models or [ModelEntry(server.model, server.served_model_name, parallel)]
    served = build_models(
        server, cache, entries, on_fatal=lambda reason: holder["server"].fatal(reason)
    )
    engine = served[0].engine
    app = create_app(engine, server, models=served)
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level="info",
        timeout_graceful_shutdown=int(server.drain_timeout_s) + 1,
        lifespan="on",
    )
    holder["server"] = uvicorn_server = _Server(config, [m.engine for m in served])
    uvicorn_server.run()
    return uvicorn_server.exit_code
