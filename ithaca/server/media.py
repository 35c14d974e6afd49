"""Image and video bytes: encode PNG/JPEG/WebP and H.264 MP4, decode uploads.

All functions are blocking CPU work; routes call them through ``asyncio.to_thread``
so the event loop keeps serving while an image is encoded.
"""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from ithaca.server.errors import APIError, invalid

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4"}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF8", "gif"))
MAX_IMAGE_BYTES = 50 * 1024 * 1024


def sniff_image(data: bytes) -> str | None:
    """The image type from the leading bytes (not the file name or declared type)."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_image(data: bytes, param: str, max_pixels: int = 4096 * 4096) -> Image.Image:
    """Decode an upload; the header's size is checked against ``max_pixels`` before any
    pixel is decoded (413), and any decoder failure is the client's bad image (400)."""
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(f"{param} is larger than {MAX_IMAGE_BYTES // 2**20} MB", param)
    kind = sniff_image(data)
    if kind is None:
        raise invalid(
            f"{param} is not a PNG, JPEG, WebP or GIF image", param, "invalid_image_format"
        )
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise _too_many_pixels(param, None, max_pixels) from None
    except Exception as exc:  # any decoder failure on untrusted bytes
        raise invalid(
            f"{param} could not be decoded as {kind}: {type(exc).__name__}", param, "invalid_image"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(param, (width, height), max_pixels)
    if width < 1 or height < 1:
        raise invalid(f"{param} has no pixels ({width}x{height})", param, "invalid_image")
    try:
        image.load()
    except Exception as exc:  # truncated or malformed data
        raise invalid(
            f"{param} could not be decoded as {kind}: {type(exc).__name__}", param, "invalid_image"
        ) from None
    return image


def _too_many_pixels(param: str, size: tuple[int, int] | None, limit: int) -> APIError:
    told = f" ({size[0]}x{size[1]})" if size else ""
    return APIError(
        413,
        f"{param} has more pixels{told} than this server decodes ({limit})",
        param=param,
        code="image_too_large",
    )


def decode_data_url(url: str, param: str, max_pixels: int = 4096 * 4096) -> Image.Image:
    """``data:image/...;base64,...`` -> image (remote URLs are not fetched)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise invalid(f"{param} must be a base64 data URL (data:image/png;base64,...)", param)
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise invalid(f"{param} must be base64-encoded", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError as exc:
        raise invalid(f"{param} is not valid base64", param) from exc
    return decode_image(data, param, max_pixels)


def encode_image(image: Image.Image, fmt: str, compression: int | None = None) -> bytes:
    """PNG (lossless; ``compression`` 0..100 maps to zlib level), JPEG or WebP
    (quality = 100 - compression)."""
    buf = io.BytesIO()
    if fmt == "png":
        level = 6 if compression is None else round(compression / 100 * 9)
        image.save(buf, format="PNG", compress_level=level)
    elif fmt in ("jpeg", "webp"):
        quality = 90 if compression is None else max(1, 100 - compression)
        image.convert("RGB").save(buf, format=fmt.upper(), quality=quality)
    else:
        raise AssertionError(fmt)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int, on_frame=None) -> bytes:
    """``(F, H, W, 3)`` uint8 -> H.264 yuv420p MP4 (odd sizes are padded to even).
    ``on_frame()`` is called after each frame is encoded (a progress bar)."""
    assert frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
    frames = np.ascontiguousarray(frames.astype(np.uint8))
    f, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:  # yuv420p needs even dimensions
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height = w + pad_w, h + pad_h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for i in range(f):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
            if on_frame is not None:
                on_frame()
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
