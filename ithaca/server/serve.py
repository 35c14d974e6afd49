"""Run the app under uvicorn: drain on SIGTERM, exit non-zero on a fatal worker failure.

SIGTERM/SIGINT: the engine stops taking requests (new ones get 503, ``/ready`` turns
503), uvicorn stops accepting connections and gives open requests
``drain_timeout_s`` to finish, then the lifespan shuts the worker groups down
(bounded). With ``on_worker_failure="exit"`` a dead group ends the process with
exit code 1 after the same bounded shutdown.
"""

from __future__ import annotations

import logging
import threading

import uvicorn

from ithaca.config import CacheConfig, ParallelConfig, ServerConfig
from ithaca.engine.engine import build_engine
from ithaca.server.app import create_app

log = logging.getLogger("ithaca.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine):
        super().__init__(config)
        self.engine = engine
        self.exit_code = 0
        self.drain_timeout_s = max(0.0, float(config.timeout_graceful_shutdown or 0) - 1.0)

    def handle_exit(self, sig, frame) -> None:
        if not self.engine.draining:
            self.engine.begin_drain()
            # At the end of the drain, requests still running get the documented 503 JSON
            # (before uvicorn's own timeout, one second later, would cancel them bare).
            timer = threading.Timer(self.drain_timeout_s, self.engine.abort_running)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)

    def fatal(self, reason: str) -> None:
        log.error("fatal: %s; shutting down", reason)
        self.exit_code = 1
        self.should_exit = True


def serve(server: ServerConfig, parallel: ParallelConfig, cache: CacheConfig | None = None) -> int:
    """Serve until SIGTERM (returns 0) or a fatal worker failure (returns 1)."""
    holder: dict = {}
    engine = build_engine(
        server, parallel, cache, on_fatal=lambda reason: holder["server"].fatal(reason)
    )
    app = create_app(engine, server)
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level="info",
        timeout_graceful_shutdown=int(server.drain_timeout_s) + 1,
        lifespan="on",
    )
    holder["server"] = uvicorn_server = _Server(config, engine)
    uvicorn_server.run()
    return uvicorn_server.exit_code
