"""Load test: N requests at concurrency C against ``ithaca serve``; nothing lost, nothing
duplicated, tail latency, and the memory of the whole process tree before and after.

    python benchmarks/load.py --requests 1000 --concurrency 32      # starts a server
    python benchmarks/load.py --url http://127.0.0.1:8091 --pid 1234 # an existing one

Without ``--url`` it starts ``ithaca serve`` on the pipeline double (``--model``,
default ``tests.engine.doubles:make_pipeline``) at ``--usp 2`` and stops it at the end.
Every request has its own seed, so every response must carry its own image:

* **lost**: a request that got no HTTP response (transport error or timeout);
* **duplicated**: a 200 whose image bytes equal another request's (a result delivered
  to the wrong request, or twice);
* **mismatched**: a seed sent twice (``--repeat``) whose two images differ.

RSS is the sum over the server and all its descendants (front + torchrun + ranks),
read from ``/proc`` before the first request and after the last.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def run_load(url: str, n: int, concurrency: int, body: dict, repeat: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    statuses: collections.Counter = collections.Counter()
    latencies: list[float] = []
    images: dict[int, list[str]] = collections.defaultdict(list)  # seed -> image hashes
    lost = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal lost
            seed = i % max(1, n - repeat) if repeat else i
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/images/generations", json={**body, "seed": seed})
                except httpx.HTTPError:
                    lost += 1
                    return
                latencies.append(time.perf_counter() - t0)
            statuses[r.status_code] += 1
            if r.status_code == 200:
                for item in r.json()["data"]:
                    images[seed].append(hashlib.sha256(item["b64_json"].encode()).hexdigest())

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    owners: dict[str, set[int]] = collections.defaultdict(set)
    for seed, hashes in images.items():
        for h in hashes:
            owners[h].add(seed)
    duplicated = sum(len(s) - 1 for s in owners.values() if len(s) > 1)
    mismatched = sum(1 for hashes in images.values() if len(set(hashes)) > 1)
    return {
        "statuses": dict(sorted(statuses.items())),
        "lost": lost,
        "duplicated": duplicated,
        "mismatched": mismatched,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "wall": wall,
    }


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = args.port or free_port()
    cmd = [
        sys.executable, "-m", "ithaca.cli", "serve", args.model, "--usp", str(args.usp),
        "--port", str(port), "--max-queue-size", str(args.max_queue_size),
        "--state-dir", f"/tmp/ithaca-load-{port}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO, "ITHACA_FAKE_STEP_S": str(args.step_s)}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("server not healthy in 600 s")
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default=None, help="an existing server (else one is started)")
    p.add_argument("--pid", type=int, default=None, help="its pid, for RSS (with --url)")
    p.add_argument("--model", default="tests.engine.doubles:make_pipeline")
    p.add_argument("--usp", type=int, default=2)
    p.add_argument("--port", type=int, default=0, help="for the started server (0: a free one)")
    p.add_argument("--step-s", type=float, default=0.0, help="the double's seconds per step")
    p.add_argument("--max-queue-size", type=int, default=64)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--repeat", type=int, default=0, help="this many seeds are sent twice")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    proc = None
    url, pid = args.url, args.pid
    if url is None:
        proc, url = start_server(args)
        pid = proc.pid
    body = {"prompt": "a lighthouse at dusk", "size": args.size, "num_inference_steps": args.steps}
    try:
        before = tree_rss(pid) if pid else 0
        out = asyncio.run(run_load(url, args.requests, args.concurrency, body, args.repeat))
        after = tree_rss(pid) if pid else 0
    finally:
        if proc is not None:
            stop_server(proc)
    print("| requests | concurrency | by status | lost | duplicated | mismatched | "
          "p50 s | p99 s | req/s | RSS before MiB | RSS after MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.requests} | {args.concurrency} | {out['statuses']} | {out['lost']} | "
        f"{out['duplicated']} | {out['mismatched']} | {out['p50']:.3f} | {out['p99']:.3f} | "
        f"{args.requests / out['wall']:.1f} | {before / 2**20:.0f} | {after / 2**20:.0f} |"
    )


if __name__ == "__main__":
    main()
