"""``ithaca serve`` processes forked from one preloaded interpreter.

Every server a test starts runs ``ithaca.cli.main(argv)`` exactly as ``python -m ithaca.cli
serve ...`` does (its own session, log file, environment, signals, uvicorn, torchrun
worker groups in fresh interpreters); only the front process's interpreter start-up and
imports (FastAPI, uvicorn, torch, diffusers: seconds of CPU each) are paid once per test run,
in a zygote process that forks one child per server. The zygote imports modules only and
starts no thread, so its children fork clean.

Protocol (one JSON line each way on the zygote's stdin/stdout): ``spawn`` -> the child's
pid; ``poll`` -> its exit code once reaped (``Popen.returncode`` convention: -N for
signal N) or null. :class:`Forked` is the ``subprocess.Popen`` face the harness uses.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time

PRELOADED = ("ithaca.cli", "ithaca.engine.engine", "ithaca.engine.group", "ithaca.models.registry",
             "ithaca.server.serve", "diffusers")  # fmt: skip


class Forked:
    """``poll`` / ``wait`` / ``send_signal`` / ``returncode`` / ``pid`` of a forked server."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.request(op="poll", pid=self.pid)["code"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked server {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class Zygote:
    _instance: Zygote | None = None
    _lock = threading.Lock()

    def __init__(self, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.server.preload"], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        threads = self.request(op="ping")["threads"]
        assert threads == 1, f"the preloaded interpreter runs {threads} threads: unsafe to fork"

    @classmethod
    def get(cls, env: dict) -> Zygote:
        with cls._lock:
            if cls._instance is None or cls._instance.proc.poll() is not None:
                cls._instance = cls(env)
            return cls._instance

    def request(self, **message) -> dict:
        with _CALL:  # one request at a time, from any thread
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the preloaded interpreter exited ({self.proc.poll()})")
        return json.loads(line)

    def spawn(self, argv: list[str], env: dict, log_path: str) -> Forked:
        return Forked(self, self.request(op="spawn", argv=argv, env=env, log=log_path)["pid"])


_CALL = threading.Lock()


def _child(argv: list[str], env: dict, log_path: str) -> None:
    """In the forked child: become ``python -m ithaca.cli ARGV`` in a session of its own."""
    os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [sys.argv[0], *argv]
    code = 1
    try:
        from ithaca.cli import main

        code = main(argv) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve_forever() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    # What every front process imports, and diffusers for --executor inprocess (no thread
    # is started by any of these: checked by the ping).
    for module in PRELOADED:
        importlib.import_module(module)

    codes: dict[int, int] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(msg["argv"], msg["env"], msg["log"])
            reply = {"pid": pid}
        elif msg["op"] == "poll":
            pid = msg["pid"]
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
            reply = {"code": codes.get(pid)}
        else:
            reply = {"threads": threading.active_count()}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve_forever()
