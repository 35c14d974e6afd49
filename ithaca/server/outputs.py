"""``response_format=url``: encoded outputs kept on disk for a bounded time.

Each output gets an unguessable id; ``GET /outputs/{id}.{ext}`` serves it until it
expires (a capability URL, like a signed URL: the id is the credential). Expired
files are removed on access and by :meth:`OutputStore.sweep`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time

from ithaca.server.media import MEDIA_TYPES

_NAME = re.compile(r"[A-Za-z0-9_-]{16,64}\.(png|jpeg|webp|mp4)")


def private_dir(path: str) -> str:
    """Create ``path`` (and parents) readable by this user only (0700)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by this user only (0600)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class OutputStore:
    def __init__(self, directory: str, ttl_s: float):
        self.directory = directory
        self.ttl_s = ttl_s
        private_dir(directory)
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes, ext: str) -> tuple[str, float]:
        """Store bytes; returns (file name, expiry unix time)."""
        assert ext in MEDIA_TYPES, ext
        name = f"{secrets.token_urlsafe(24)}.{ext}"
        write_private(os.path.join(self.directory, name), data)
        expires = time.time() + self.ttl_s
        with self._lock:
            self._expiry[name] = expires
        return name, expires

    def path(self, name: str) -> str | None:
        """The file of ``name`` if it exists and has not expired."""
        if not _NAME.fullmatch(name):  # also keeps "/", "..", NUL bytes out of the path
            return None
        with self._lock:
            expires = self._expiry.get(name)
        path = os.path.join(self.directory, name)
        if expires is None:  # from before a restart: trust the file's age
            try:
                expires = os.path.getmtime(path) + self.ttl_s
            except OSError:
                return None
        if time.time() > expires:
            self._remove(name)
            return None
        return path if os.path.exists(path) else None

    def _remove(self, name: str) -> None:
        with self._lock:
            self._expiry.pop(name, None)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.directory, name))

    def sweep(self) -> int:
        """Delete every expired output; returns how many."""
        now, removed = time.time(), 0
        for name in os.listdir(self.directory):
            try:
                expires = (
                    self._expiry.get(name)
                    or os.path.getmtime(os.path.join(self.directory, name)) + self.ttl_s
                )
            except OSError:
                continue
            if now > expires:
                self._remove(name)
                removed += 1
        return removed
