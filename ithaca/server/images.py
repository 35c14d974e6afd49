"""``/v1/images/generations`` and ``/v1/images/edits``, plain and streamed (SSE)."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ithaca.engine.errors import EngineError
from ithaca.server import media
from ithaca.server.errors import APIError, from_engine, invalid
from ithaca.server.loras import check_request_loras
from ithaca.server.protocol import ImageEditJSON, ImageRequest
from ithaca.server.state import (
    ServedModel,
    ServerState,
    admit,
    escape,
    log,
    log_ignored,
    read_json,
    request_id,
    server_state,
    wait_result,
)
from ithaca.types import GenerationParams, GenerationResult

router = APIRouter()
MAX_EDIT_IMAGES = 16
_FILE_FIELDS = ("image", "image[]", "mask")
USAGE = {
    "total_tokens": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
}


@router.post("/v1/images/generations")
async def generations(request: Request):
    state = server_state(request)
    body = ImageRequest.model_validate(await read_json(request))
    log_ignored(request, body.extra_fields())
    served = state.resolve_model(body.model, "image")
    return await _serve(request, state, served, body, body.to_params(), "image_generation")


@router.post("/v1/images/edits")
async def edits(request: Request):
    state = server_state(request)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body, images, mask = await _edit_form(request, state.config.max_input_pixels)
    else:
        body = ImageEditJSON.model_validate(await read_json(request))
        limit = state.config.max_input_pixels
        refs = [(ref, f"images[{i}]") for i, ref in enumerate(body.images)]
        if body.mask is not None:
            refs.append((body.mask, "mask"))
        decoded = await asyncio.to_thread(lambda: [_json_image(r, p, limit) for r, p in refs])
        images = decoded[: len(body.images)]
        mask = decoded[len(body.images)] if body.mask is not None else None
    log_ignored(request, body.extra_fields())
    served = state.resolve_model(body.model, "image")
    if mask is not None and mask.size != images[0].size:
        raise invalid(
            f"mask size {mask.size} must equal the first image's size {images[0].size}", "mask"
        )
    params = body.to_params()
    # A layered request keeps the inputs' alpha; every other pipeline takes RGB.
    mode = "RGB" if params.layers is None else "RGBA"
    params.images = await asyncio.to_thread(lambda: [img.convert(mode) for img in images])
    return await _serve(request, state, served, body, params, "image_edit")


@router.get("/outputs/{name}")
async def output(request: Request, name: str):
    path = server_state(request).outputs.path(name)
    if path is None:
        raise APIError(404, "this output does not exist or has expired", code="not_found")
    ext = name.rsplit(".", 1)[-1]
    return FileResponse(path, media_type=media.MEDIA_TYPES.get(ext, "application/octet-stream"))


async def read_form(request: Request, max_files: int, file_param: str):
    """The multipart form; a malformed one (or too many files) is a 400 naming the file field."""
    try:
        return await request.form(max_files=max_files)
    except (StarletteHTTPException, MultiPartException, ValueError) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        raise invalid(f"invalid multipart body: {detail}", file_param, "invalid_form") from None


async def decode_upload(upload: UploadFile, param: str, max_pixels: int) -> Image.Image:
    """Read and decode one uploaded image off the event loop."""
    data = await upload.read()
    return await asyncio.to_thread(media.decode_image, data, param, max_pixels)


async def _edit_form(request: Request, max_pixels: int):
    form = await read_form(request, MAX_EDIT_IMAGES + 2, "image")
    uploads = [*form.getlist("image"), *form.getlist("image[]")]
    if not uploads:
        raise invalid("image is required (one file as image, or up to 16 as image[])", "image")
    if len(uploads) > MAX_EDIT_IMAGES:
        raise invalid(f"at most {MAX_EDIT_IMAGES} images, got {len(uploads)}", "image")
    fields = {k: v for k, v in form.multi_items() if k not in _FILE_FIELDS}
    for k, v in fields.items():
        if not isinstance(v, str):
            raise invalid(f"{k} must be a plain form field, not a file", k)
    body = ImageRequest.model_validate({k: (None if v == "null" else v) for k, v in fields.items()})
    images = []
    for upload in uploads:
        if not isinstance(upload, UploadFile):
            raise invalid("image must be a file upload", "image")
        images.append(await decode_upload(upload, "image", max_pixels))
    mask = None
    mask_upload = form.get("mask")
    if isinstance(mask_upload, UploadFile):
        mask = await decode_upload(mask_upload, "mask", max_pixels)
    return body, images, mask


def _json_image(ref, param: str, max_pixels: int) -> Image.Image:
    if ref.file_id is not None and ref.image_url is None:
        raise invalid(f"{param}.file_id is not supported; send image_url as a data URL", param)
    if ref.image_url is None:
        raise invalid(f"{param}.image_url is required", param)
    return media.decode_data_url(ref.image_url, f"{param}.image_url", max_pixels)


def _images_of(results: GenerationResult) -> list[Image.Image]:
    return list(results.images)


async def _serve(
    request, state: ServerState, served: ServedModel, body: ImageRequest, params, kind
):
    fmt = body.output_format or "png"
    meta = {
        "background": "opaque",
        "output_format": fmt,
        "quality": body.quality or "auto",
    }
    check_request_loras(served.engine, params)
    engine = served.engine
    warnings = served.warnings(params.prompt)
    for warning in warnings:
        log.warning("[%s] %s", request_id(request), escape(warning))
    resolved = await admit(state, engine, request, params)
    if body.stream:
        return _stream(request, state, engine, body, params, kind, meta, resolved)
    req = engine.submit(params, label=request_id(request), resolved=resolved)
    result = await wait_result(engine, req, request)
    images = _images_of(result)
    encoded = await asyncio.to_thread(
        lambda: [media.encode_image(img, fmt, body.output_compression) for img in images]
    )
    data = []
    for blob in encoded:
        if body.response_format == "url":
            name, _ = await asyncio.to_thread(state.outputs.put, blob, fmt)
            data.append({"url": str(request.base_url).rstrip("/") + f"/outputs/{name}"})
        else:
            data.append({"b64_json": media.b64(blob)})
    size = f"{images[0].width}x{images[0].height}" if images else None
    meta["background"] = _background(images[0], fmt) if images else meta["background"]
    body_out = {"created": int(time.time()), "data": data, **meta, "size": size, "usage": USAGE}
    if "cache" in result.metadata:  # extension: what the step cache skipped for this request
        body_out["cache"] = result.metadata["cache"]
    if "lora" in result.metadata:  # extension: the adapters and scales applied
        body_out["lora"] = result.metadata["lora"]
    # extension: words of the prompt the model never learned, and the engine's warnings
    # (e.g. idle CFG-parallel ranks)
    warnings = warnings + list(result.metadata.get("warnings") or [])
    if warnings:
        body_out["warnings"] = warnings
    return JSONResponse(body_out, headers=timing_headers(req, result))


def _background(image: Image.Image, fmt: str) -> str:
    """``transparent`` for PNGs with alpha (layers of a layered model), else ``opaque``
    (JPEG and WebP outputs are encoded as RGB)."""
    return "transparent" if image.mode == "RGBA" and fmt == "png" else "opaque"


def timing_headers(req, result: GenerationResult) -> dict[str, str]:
    """Where the time went, for benchmarks: queue wait, engine (submit to result, incl.
    the socket hop to rank 0) and the pipeline's own ``generate`` time when it reports it."""
    out = {}
    if req.started is not None and req.finished is not None:
        out["x-ithaca-queue-seconds"] = f"{req.started - req.arrival:.4f}"
        out["x-ithaca-engine-seconds"] = f"{req.finished - req.arrival:.4f}"
    timings = result.metadata.get("timings") or {}
    if "total_s" in timings:
        out["x-ithaca-pipeline-seconds"] = f"{timings['total_s']:.4f}"
    return out


def _sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _stream(
    request, state: ServerState, engine, body, params: GenerationParams, kind: str, meta, resolved
):
    """Submit now (so 429/503 are plain errors), then stream previews and results."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    fmt = meta["output_format"]
    wanted = params.partial_images

    def on_progress(step: int, total: int, previews) -> None:
        if previews:
            loop.call_soon_threadsafe(events.put_nowait, ("previews", previews))

    req = engine.submit(params, on_progress, label=request_id(request), resolved=resolved)
    req.future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, ("done",)))

    async def encode_event(image: Image.Image, event_type: str, **extra) -> bytes:
        blob = await asyncio.to_thread(media.encode_image, image, fmt, body.output_compression)
        size = f"{image.width}x{image.height}"
        event = {
            "type": event_type,
            "b64_json": media.b64(blob),
            "created_at": int(time.time()),
            "size": size,
            **meta,
            "background": _background(image, fmt),
            **extra,
        }
        return _sse(event)

    async def generate():
        sent = 0  # partial images sent per output image
        finished = False
        try:
            while True:
                item = await events.get()
                if item[0] == "previews":
                    if sent >= wanted:
                        continue
                    for image in item[1]:
                        yield await encode_event(
                            image, f"{kind}.partial_image", partial_image_index=sent
                        )
                    sent += 1
                    continue
                finished = True
                error = req.future.exception()
                if error is not None:
                    api = (
                        from_engine(error)
                        if isinstance(error, EngineError)
                        else APIError(500, "internal server error", code="internal_error")
                    )
                    yield _sse({"type": "error", **api.body()})
                    return
                for image in _images_of(req.future.result()):
                    yield await encode_event(image, f"{kind}.completed", usage=USAGE)
                return
        finally:
            if not finished:
                engine.cancel(req)

    return StreamingResponse(generate(), media_type="text/event-stream")
