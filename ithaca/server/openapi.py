"""``/openapi.json`` as the routes really behave, so a schema fuzzer can test the real API.

The generation routes read their bodies themselves (JSON or multipart, one pydantic model
for both), so FastAPI cannot see them: this module adds every request body (the JSON
schema of the pydantic model; the multipart form the openai SDK sends) and replaces
FastAPI's guessed responses (a ``422`` the server never sends) with the statuses each
route returns, every error with the one error body.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ithaca.server.protocol import ImageEditJSON, ImageRequest, VideoJSON, VideoRequest

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_WHY = {
    400: "Invalid request (the offending field is `param`), or too costly to admit",
    401: "Missing or wrong API key (when the server has one)",
    403: "LoRA loading is off (no --lora-dir) or the path is outside it",
    404: "Unknown model, route, video, output or LoRA",
    409: "The video is not completed, or a LoRA of that name is already loaded",
    413: "Body larger than --max-body-bytes, or an image with more than --max-input-pixels",
    415: "A body that is not application/json (or multipart where accepted)",
    429: "Queue full; retry after Retry-After seconds",
    499: "The client closed the request",
    500: "Internal failure of the pipeline (details only in the server log)",
    503: "Model loading, worker group down or restarting, or the server draining",
}
_SUBMIT = (400, 401, 404, 413, 415, 429, 499, 500, 503)
_JSON = {"application/json": {"schema": {"type": "object"}}}
_STATUSES: dict[tuple[str, str], tuple[dict, tuple[int, ...]]] = {
    ("/v1/images/generations", "post"): (
        {**_JSON, "text/event-stream": {"schema": {"type": "string"}}},
        _SUBMIT,
    ),
    ("/v1/images/edits", "post"): (
        {**_JSON, "text/event-stream": {"schema": {"type": "string"}}},
        _SUBMIT,
    ),
    ("/v1/videos", "post"): (_JSON, (400, 401, 404, 413, 415, 429, 503)),
    ("/v1/videos", "get"): (_JSON, (400, 401)),
    ("/v1/videos/{video_id}", "get"): (_JSON, (400, 401, 404)),
    ("/v1/videos/{video_id}", "delete"): (_JSON, (400, 401, 404)),
    ("/v1/videos/{video_id}/content", "get"): (
        {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
        (400, 401, 404, 409),
    ),
    ("/v1/models", "get"): (_JSON, (401,)),
    ("/v1/models/{model_id}", "get"): (_JSON, (400, 401, 404)),
    ("/outputs/{name}", "get"): (
        {
            f"image/{kind}": {"schema": {"type": "string", "format": "binary"}}
            for kind in ("png", "jpeg", "webp")
        },
        (400, 404),
    ),
    ("/v1/loras", "get"): (_JSON, (400, 401)),
    ("/v1/loras", "post"): (_JSON, (400, 401, 403, 409, 413, 415, 500, 503)),
    ("/v1/loras/{name}", "delete"): (_JSON, (400, 401, 404, 500, 503)),
    ("/health", "get"): (_JSON, (503,)),
    ("/ready", "get"): (_JSON, (503,)),
    ("/metrics", "get"): ({"text/plain": {"schema": {"type": "string"}}}, ()),
}


def _form(model: type[BaseModel], files: dict[str, dict]) -> dict:
    """The multipart form of ``model``: every field as text (the SDK's encoding) + files."""
    props: dict[str, dict] = {"prompt": {"type": "string", "minLength": 1}}
    for name in model.model_fields:
        props.setdefault(name, {"type": "string"})
    return {"type": "object", "required": ["prompt", *files], "properties": {**props, **files}}


def _binary() -> dict:
    return {"type": "string", "format": "binary"}


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version="1", routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = ERROR

        def ref(model: type[BaseModel]) -> dict:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        bodies = {
            "/v1/images/generations": {"application/json": {"schema": ref(ImageRequest)}},
            "/v1/images/edits": {
                "application/json": {"schema": ref(ImageEditJSON)},
                "multipart/form-data": {
                    "schema": _form(ImageRequest, {"image": _binary()}),
                },
            },
            "/v1/videos": {
                "application/json": {"schema": ref(VideoJSON)},
                "multipart/form-data": {"schema": _form(VideoRequest, {})},
            },
        }
        for path, item in schema["paths"].items():
            for method, op in item.items():
                ok, errors = _STATUSES.get((path.replace(":path", ""), method), (_JSON, ()))
                op["responses"] = {
                    "200": {"description": "OK", "content": ok},
                    **{
                        str(code): {
                            "description": _WHY[code],
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Error"}
                                }
                            },
                        }
                        for code in errors
                    },
                }
                if method == "post" and path in bodies:
                    op["requestBody"] = {"required": True, "content": bodies[path]}
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
