"""The local socket between the front process and rank 0 of a worker group.

Length-prefixed pickles over a Unix socket in a private (0700) directory; the first
message a worker sends carries a random token the front checks in constant time, so
only processes the front launched can talk to it. Messages are tuples whose first
item names them:

    worker -> front: ("hello", token, pid) ("ready", ranks) ("failed", message)
                     ("alive",) ("step", batch_id, StepEvent) ("result", batch_id, results)
                     ("decode", batch_id, chunk, chunks)
                     ("error", batch_id, kind, message) ("fatal", message)
    front -> worker: ("batch", batch_id, [GenerationParams]) ("cancel", batch_id) ("shutdown",)
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import struct
import threading

_HEADER = struct.Struct("!Q")


class ChannelClosed(ConnectionError):
    """The peer closed the socket (or died)."""


class Channel:
    """Framed, thread-safe sends and single-reader receives over one connected socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)
        return cls(sock)

    def send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self.sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    def _read(self, n: int) -> bytes:
        chunks, remaining = [], n
        while remaining:
            try:
                chunk = self.sock.recv(min(remaining, 1 << 20))
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not chunk:
                raise ChannelClosed("peer closed the connection")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def recv(self) -> tuple:
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        return pickle.loads(self._read(size))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
