"""Video jobs that survive a restart: one SQLite table plus MP4 files on disk.

A job moves ``queued -> in_progress -> completed | failed``. Its generation parameters
(JSON, with a seed fixed at creation) and its input image (PNG) are stored with it, so
jobs a previous process left ``queued`` or ``in_progress`` go back to ``queued`` on open
(:meth:`VideoStore.unfinished`) and the server runs them again: the same seed gives the
same video as an uninterrupted run. Jobs stored without parameters (older databases)
are marked ``failed`` with ``server_restarted``. Finished jobs expire ``ttl_s`` after
they finish (``expires_at``); :meth:`VideoStore.sweep` removes them and their files.
Directory 0700, files 0600. Writes are serialised by one lock; SQLite runs in WAL mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass

from ithaca.server.outputs import private_dir

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
    path TEXT,
    params TEXT
)
"""


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
    params: str | None = None
    """JSON of the job's GenerationParams (without images), to rerun it after a restart."""

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
            **self._lora(),
        }

    def _lora(self) -> dict:
        """Extension: the LoRA adapters and scales the job applies (as image responses)."""
        lora = json.loads(self.params).get("lora") if self.params else None
        return (
            {"lora": [{k: v for k, v in r.items() if v is not None} for r in lora]} if lora else {}
        )


class VideoStore:
    def __init__(self, directory: str, ttl_s: float = 7 * 24 * 3600.0):
        self.directory = directory
        self.ttl_s = ttl_s
        self.files = os.path.join(directory, "videos")
        private_dir(self.files)
        db_path = os.path.join(directory, "videos.sqlite3")
        # SQLite creates the database, -wal and -shm files with the umask: make them 0600.
        old_umask = os.umask(0o077)
        try:
            self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._lock = threading.Lock()
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(_SCHEMA)
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(videos)")}
                if "params" not in columns:  # a database from before restartable jobs
                    self._db.execute("ALTER TABLE videos ADD COLUMN params TEXT")
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.chmod(db_path + suffix, 0o600)
        self.requeued, self.failed_on_open = self._requeue_unfinished()

    def _requeue_unfinished(self) -> tuple[int, int]:
        """Unfinished jobs of a previous process: back to ``queued`` when they can rerun."""
        error = json.dumps(
            {
                "code": "server_restarted",
                "message": "the server stopped while this job was queued or running",
            }
        )
        now = int(time.time())
        with self._lock:
            failed = self._db.execute(
                "UPDATE videos SET status='failed', progress=0, error=?, completed_at=?, "
                "expires_at=? WHERE status IN ('queued', 'in_progress') AND params IS NULL",
                (error, now, now + int(self.ttl_s)),
            )
            cur = self._db.execute(
                "UPDATE videos SET status='queued', progress=0 "
                "WHERE status IN ('queued', 'in_progress')"
            )
        return cur.rowcount, failed.rowcount

    def unfinished(self) -> list[VideoJob]:
        """Queued jobs in creation order (after a restart: the ones to run again)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM videos WHERE status='queued' ORDER BY seq"
            ).fetchall()
        return [VideoJob(**dict(r)) for r in rows]

    def input_path(self, job_id: str) -> str:
        return os.path.join(self.files, f"{job_id}.input.png")

    def create(
        self,
        job_id: str,
        model: str,
        prompt: str,
        seconds: str,
        size: str,
        params: str | None = None,
    ) -> VideoJob:
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM videos").fetchone()[0]
            job = VideoJob(job_id, int(time.time()), seq, "queued", 0, model, prompt, seconds, size)
            job.params = params
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

    def _finish(self, job_id: str, **fields) -> None:
        """Set ``fields`` and stamp completion now; the job expires ``ttl_s`` later."""
        now = int(time.time())
        self.update(job_id, completed_at=now, expires_at=now + int(self.ttl_s), **fields)

    def fail(self, job_id: str, code: str, message: str) -> None:
        error = json.dumps({"code": code, "message": message})
        self._finish(job_id, status="failed", progress=0, error=error)

    def complete(self, job_id: str, path: str, size: str) -> None:
        self._finish(job_id, status="completed", progress=100, path=path, size=size)

    def get(self, job_id: str) -> VideoJob | None:
        """The job, or None when unknown or expired."""
        with self._lock:
            row = self._db.execute("SELECT * FROM videos WHERE id=?", (job_id,)).fetchone()
        job = VideoJob(**dict(row)) if row else None
        if job is not None and job.expires_at is not None and job.expires_at <= time.time():
            return None
        return job

    def sweep(self) -> int:
        """Delete expired jobs and their files; returns how many."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM videos WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (int(time.time()),),
            ).fetchall()
        for row in rows:
            self.delete(row[0], expired_ok=True)
        return len(rows)

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

    def delete(self, job_id: str, expired_ok: bool = False) -> bool:
        with self._lock:
            row = self._db.execute("SELECT * FROM videos WHERE id=?", (job_id,)).fetchone()
        job = VideoJob(**dict(row)) if row else None
        if job is None or (not expired_ok and self.get(job_id) is None):
            return False
        with self._lock:
            self._db.execute("DELETE FROM videos WHERE id=?", (job_id,))
        for path in (job.path, self.input_path(job_id), self.checkpoint_path(job_id)):
            if path:
                with contextlib.suppress(OSError):
                    os.remove(path)
        return True

    def video_path(self, job_id: str) -> str:
        return os.path.join(self.files, f"{job_id}.mp4")

    def checkpoint_path(self, job_id: str) -> str:
        """The running job's saved step (written by the returning rank, 0600)."""
        return os.path.join(self.files, f"{job_id}.steps")

    def close(self) -> None:
        with self._lock:
            self._db.close()
