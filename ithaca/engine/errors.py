"""Engine failures: one exception type per way a request can fail.

The server maps each to an HTTP status (``status``) and an OpenAI error ``type`` /
``code``; ``reason`` labels the failure in metrics. User mistakes stay ``ValueError``.
"""

from __future__ import annotations


class EngineError(Exception):
    """A request could not be served."""

    status = 500
    reason = "internal"
    code = "internal_error"


class QueueFullError(EngineError):
    """The bounded queue is full; the client should retry after ``retry_after`` s."""

    status = 429
    reason = "queue_full"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(EngineError):
    """No live worker group: a rank died or hung, or the engine is restarting."""

    status = 503
    reason = "engine_dead"
    code = "engine_unavailable"


class EngineNotReadyError(EngineDeadError):
    """Weights are still loading or not every rank has joined yet."""

    reason = "not_ready"


class DrainingError(EngineDeadError):
    """The server is shutting down and takes no new requests."""

    reason = "draining"
    code = "server_shutting_down"


class RequestCancelledError(EngineError):
    """The client went away or the request was deleted."""

    status = 499
    reason = "cancelled"
    code = "request_cancelled"


class GenerationFailedError(EngineError):
    """The pipeline raised on a worker; ``kind`` is ``invalid_request`` for its ValueErrors.

    The message of an ``invalid_request`` failure is the ValueError's text (for the
    client); an internal failure's message is only for the log (see :func:`client_message`).
    ``param``: the request field a :class:`ithaca.types.ParamError` named (the error body's
    ``param``), else None.
    """

    def __init__(self, message: str, kind: str = "internal", param: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.param = param
        if kind == "invalid_request":
            self.status = 400
            self.reason = "invalid_request"
            self.code = "invalid_value"
        else:
            self.reason = "pipeline_error"


class AdmissionError(EngineError):
    """The request cannot fit: its estimated time or memory exceeds the server's limit."""

    status = 400
    reason = "too_costly"
    code = "request_too_large"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def client_message(exc: EngineError) -> str:
    """What a client may read: no tracebacks, paths or peer addresses."""
    if isinstance(exc, GenerationFailedError) and exc.kind not in (
        "invalid_request",
        "out_of_memory",  # its message says what to lower; no path or traceback in it
    ):
        return "the generation failed with an internal error (details are in the server log)"
    if isinstance(exc, WorkerGroupDiedError):
        return "a worker group failed while running this request; retry shortly"
    return str(exc)


class WorkerGroupDiedError(EngineDeadError):
    """Raised by an executor whose worker group died or hung while (or before) running."""

    reason = "worker_died"
