"""Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}``.

:class:`APIError` is what routes raise; engine failures, pydantic validation errors,
Starlette's HTTP errors (404 route, 405 method) are mapped to it here, anything
unexpected in :class:`~ithaca.server.app.EdgeMiddleware`, so FastAPI's
``{"detail": ...}`` never reaches a client.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ithaca.engine.errors import EngineError, QueueFullError, client_message

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine(exc: EngineError) -> APIError:
    headers = {}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(exc.retry_after)
    elif exc.status == 503:
        headers["Retry-After"] = "5"
    param = getattr(exc, "param", None)
    return APIError(exc.status, client_message(exc), param=param, code=exc.code, headers=headers)


def from_validation(errors: list[dict]) -> APIError:
    """The first pydantic error, with the offending field as ``param``."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "form", "query")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    return invalid(message, param)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return from_engine(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError):
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        # 405 keeps Starlette's Allow header.
        return APIError(
            exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})
        ).response()

    # Anything else is caught by the edge middleware (a 500 that keeps the connection).
