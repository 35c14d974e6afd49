"""Video jobs that survive a restart: one SQLite table plus MP4 files on disk.

A job moves ``queued -> in_progress -> completed | failed``. On open, jobs a previous
process left ``queued`` or ``in_progress`` are marked ``failed`` with the reason
``server_restarted`` (their inputs lived in that process's memory), so nothing stays
"in_progress" forever. Writes are serialised by one lock; SQLite runs in WAL mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    completed_at INTEGER,
    expires_at INTEGER,
    error TEXT,
    path TEXT
)
"""

TERMINAL = ("completed", "failed")


@dataclass
class VideoJob:
    id: str
    created_at: int
    seq: int
    status: str
    progress: int
    model: str
    prompt: str | None
    seconds: str
    size: str
    completed_at: int | None = None
    expires_at: int | None = None
    error: str | None = None
    """JSON ``{"code", "message"}`` when failed."""
    path: str | None = None

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "object": "video",
            "created_at": self.created_at,
            "status": self.status,
            "progress": self.progress,
            "model": self.model,
            "prompt": self.prompt,
            "seconds": self.seconds,
            "size": self.size,
            "completed_at": self.completed_at,
            "expires_at": self.expires_at,
            "error": json.loads(self.error) if self.error else None,
            "remixed_from_video_id": None,
        }


class VideoStore:
    def __init__(self, directory: str):
        self.directory = directory
        self.files = os.path.join(directory, "videos")
        os.makedirs(self.files, exist_ok=True)
        self._db = sqlite3.connect(
            os.path.join(directory, "videos.sqlite3"), check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
        self.recovered = self._fail_unfinished()

    def _fail_unfinished(self) -> int:
        error = json.dumps(
            {
                "code": "server_restarted",
                "message": "the server stopped while this job was queued or running",
            }
        )
        with self._lock:
            cur = self._db.execute(
                "UPDATE videos SET status='failed', error=?, completed_at=? "
                "WHERE status IN ('queued', 'in_progress')",
                (error, int(time.time())),
            )
        return cur.rowcount

    def create(self, job_id: str, model: str, prompt: str, seconds: str, size: str) -> VideoJob:
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM videos").fetchone()[0]
            job = VideoJob(job_id, int(time.time()), seq, "queued", 0, model, prompt, seconds, size)
            row = asdict(job)
            self._db.execute(
                f"INSERT INTO videos ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
        return job

    def update(self, job_id: str, **fields) -> None:
        assert fields and set(fields) <= set(VideoJob.__dataclass_fields__) - {"id"}, fields
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE videos SET {sets} WHERE id=?", (*fields.values(), job_id))

    def fail(self, job_id: str, code: str, message: str) -> None:
        self.update(
            job_id,
            status="failed",
            error=json.dumps({"code": code, "message": message}),
            completed_at=int(time.time()),
        )

    def get(self, job_id: str) -> VideoJob | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM videos WHERE id=?", (job_id,)).fetchone()
        return VideoJob(**dict(row)) if row else None

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool]:
        """Jobs by creation order (``asc``/``desc``), starting after the ``after`` cursor."""
        assert order in ("asc", "desc")
        op = ">" if order == "asc" else "<"
        with self._lock:
            params: list = []
            where = ""
            if after is not None:
                cursor = self._db.execute("SELECT seq FROM videos WHERE id=?", (after,)).fetchone()
                if cursor is None:
                    raise KeyError(after)
                where, params = f"WHERE seq {op} ?", [cursor[0]]
            rows = self._db.execute(
                f"SELECT * FROM videos {where} ORDER BY seq {order.upper()} LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
        jobs = [VideoJob(**dict(r)) for r in rows]
        return jobs[:limit], len(jobs) > limit

    def delete(self, job_id: str) -> bool:
        job = self.get(job_id)
        if job is None:
            return False
        with self._lock:
            self._db.execute("DELETE FROM videos WHERE id=?", (job_id,))
        if job.path:
            with contextlib.suppress(OSError):
                os.remove(job.path)
        return True

    def video_path(self, job_id: str) -> str:
        return os.path.join(self.files, f"{job_id}.mp4")

    def close(self) -> None:
        with self._lock:
            self._db.close()
