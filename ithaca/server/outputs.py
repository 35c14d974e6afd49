"""``response_format=url``: encoded outputs kept on disk for a bounded time.

Each output gets an unguessable id; ``GET /outputs/{id}.{ext}`` serves it until it
expires (a capability URL, like a signed URL: the id is the credential). Expired
files are removed on access and by :meth:`OutputStore.sweep`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time

from ithaca.server.media import MEDIA_TYPES


class OutputStore:
    def __init__(self, directory: str, ttl_s: float):
        self.directory = directory
        self.ttl_s = ttl_s
        os.makedirs(directory, exist_ok=True)
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes, ext: str) -> tuple[str, float]:
        """Store bytes; returns (file name, expiry unix time)."""
        assert ext in MEDIA_TYPES, ext
        name = f"{secrets.token_urlsafe(24)}.{ext}"
        path = os.path.join(self.directory, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        expires = time.time() + self.ttl_s
        with self._lock:
            self._expiry[name] = expires
        return name, expires

    def path(self, name: str) -> str | None:
        """The file of ``name`` if it exists and has not expired."""
        if "/" in name or name.startswith("."):
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
