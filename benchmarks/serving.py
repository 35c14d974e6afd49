"""Serving benchmark (in the spirit of vLLM's benchmark_serving): a concurrency sweep
against a running ``ithaca serve``, and the overhead of the HTTP path over a direct
pipeline call on the same request.

    ithaca serve --usp 1 &                        # or any layout / model
    python benchmarks/serving.py --url http://127.0.0.1:8091 --concurrency 1,2,4,8 \
        --requests 16 --size 64x64 --steps 2 --direct

For each concurrency level, ``--requests`` requests go out with at most that many in
flight; the table shows throughput (images/s), p50/p99 latency and the server's batch
sizes (from /metrics). ``--direct`` loads the same model in this process (one rank,
``pipeline.generate`` with no engine, no HTTP) and times the same request, so
the two can be compared (alternating, so both see the same machine load). The
robust overhead number needs no second process: the server reports, per response,
the engine time (``x-ithaca-engine-seconds``: submit to result, including the queue
and the socket hop to rank 0) and the pipeline's own ``generate`` time
(``x-ithaca-pipeline-seconds``), so ``client latency - pipeline time`` on the *same*
request is what the front door costs (JSON, queueing, IPC, PNG encoding, base64).

Batching modes side by side (in this process: one engine per mode over one loaded
pipeline, one rank, no HTTP), the way LLM serving benchmarks drive a server:

    OMP_NUM_THREADS=2 python benchmarks/serving.py --modes off,fused,continuous \
        --size 128x128 --steps 20 --rate 4 --requests 32 --concurrency 1,8

The same over a torchrun worker group (``--group-usp 2``: Ulysses 2, started once and
shared by the modes ``off``, ``fused`` and ``continuous``, each an engine setting):

    python benchmarks/serving.py --modes fused,continuous --group-usp 2 \
        --size 128x128 --steps 20 --requests 16 --rate -0.9 --concurrency 1,8

``--concurrency`` runs closed loops per mode (that many requests in flight); ``--rate``
sends ``--requests`` requests with Poisson arrivals (exponential gaps, seeded), open
loop: a slow server does not slow the arrivals. Each row: throughput (images/s), p50 /
p99 latency and p50 / p99 queue time (arrival to the first step). Modes: ``off`` (one
request per forward), ``invariant`` (batches, each request its own loop: exact solo
bytes), ``fused`` (whole batches share forwards, the default) and ``continuous``
(requests join a running batch at the next step). ``--rate`` also works against
``--url`` (one mode: the server's).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import threading
import time

import httpx


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def batch_stats(metrics: str) -> tuple[float, float]:
    count = total = 0.0
    for line in metrics.splitlines():
        if line.startswith("ithaca_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("ithaca_batch_size_sum"):
            total = float(line.split()[-1])
    return count, total


async def sweep_level(client, body, concurrency: int, n: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    splits: list[tuple[float, float, float]] = []  # (client, engine, pipeline) seconds
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with sem:
            t0 = time.perf_counter()
            r = await client.post("/v1/images/generations", json={**body, "seed": i})
            if r.status_code != 200:
                failures += 1
                return
            latencies.append(time.perf_counter() - t0)
            h = r.headers
            if "x-ithaca-pipeline-seconds" in h:
                splits.append(
                    (
                        latencies[-1],
                        float(h["x-ithaca-engine-seconds"]),
                        float(h["x-ithaca-pipeline-seconds"]),
                    )
                )

    before = batch_stats((await client.get("/metrics")).text)
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    after = batch_stats((await client.get("/metrics")).text)
    batches, reqs = after[0] - before[0], after[1] - before[1]
    return {
        "concurrency": concurrency,
        "ok": len(latencies),
        "failed": failures,
        "throughput": len(latencies) / wall,
        "p50": percentile(latencies, 50) if latencies else float("nan"),
        "p99": percentile(latencies, 99) if latencies else float("nan"),
        "mean_batch": reqs / batches if batches else float("nan"),
        "splits": splits,
    }


async def overhead(client, body: dict, model: str | None, reps: int) -> dict:
    """Alternate a direct ``pipeline.generate`` (this process, one rank, no engine) and
    the same request over HTTP, so both see the same machine load; paired medians."""
    from ithaca.engine.executor import PipelineSpec, load_pipeline
    from ithaca.parallel.state import ParallelState
    from ithaca.types import GenerationParams

    w, h = (int(x) for x in body["size"].split("x"))
    pipe = load_pipeline(PipelineSpec(model), ParallelState.single())
    direct, http = [], []
    for i in range(reps + 1):
        params = GenerationParams(
            body["prompt"], width=w, height=h, num_inference_steps=body["num_inference_steps"],
            seed=i, request_id=str(i),
        )  # fmt: skip
        t0 = time.perf_counter()
        pipe.generate([params])
        t1 = time.perf_counter()
        r = await client.post("/v1/images/generations", json={**body, "seed": i})
        t2 = time.perf_counter()
        assert r.status_code == 200, r.text
        if i:  # the first pair warms up
            direct.append(t1 - t0)
            http.append(t2 - t1)
    diffs = [b - a for a, b in zip(direct, http, strict=True)]
    return {
        "direct": statistics.median(direct),
        "http": statistics.median(http),
        "diff": statistics.median(diffs),
    }


def summary(latencies: list[float], queues: list[float], images: int, wall: float) -> dict:
    return {
        "ok": len(latencies),
        "throughput": images / wall,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "q50": percentile(queues, 50) if queues else float("nan"),
        "q99": percentile(queues, 99) if queues else float("nan"),
    }


def arrival_times(rate: float, n: int, seed: int = 0) -> list[float]:
    """Poisson arrivals: offsets (s) from the start, exponential gaps of mean 1/rate."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def open_loop_http(client, body: dict, rate: float, n: int) -> dict:
    """``n`` requests at Poisson arrivals against a server (queue time: its header)."""
    latencies, queues = [], []
    start = time.perf_counter()

    async def one(i: int, at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        t0 = time.perf_counter()
        r = await client.post("/v1/images/generations", json={**body, "seed": i})
        if r.status_code == 200:
            latencies.append(time.perf_counter() - t0)
            h = r.headers
            if "x-ithaca-pipeline-seconds" in h:
                engine, pipe = (float(h[k]) for k in ENGINE_HEADERS)
                queues.append(max(0.0, engine - pipe))

    await asyncio.gather(*(one(i, at) for i, at in enumerate(arrival_times(rate, n))))
    return summary(latencies, queues, len(latencies), time.perf_counter() - start)


ENGINE_HEADERS = ("x-ithaca-engine-seconds", "x-ithaca-pipeline-seconds")


def run_engine(engine, make, arrivals: list[float] | None, concurrency: int, n: int) -> dict:
    """Drive an in-process engine: open loop at ``arrivals`` or closed at ``concurrency``."""
    done: list = []
    # As the server does, requests carry their validation (a worker group's join key);
    # it does not depend on the seed, so it is asked once, not in the arrivals' path (the
    # server validates concurrently; one driver thread would space the arrivals apart).
    resolved = engine.validate(make(0))
    start = time.monotonic()

    def submit(params):
        return engine.submit(params, resolved=resolved)

    if arrivals is not None:
        for i, at in enumerate(arrivals):
            time.sleep(max(0.0, start + at - time.monotonic()))
            done.append(submit(make(i)))
    else:
        slots = threading.Semaphore(concurrency)
        for i in range(n):
            slots.acquire()
            req = submit(make(i))
            req.future.add_done_callback(lambda f: slots.release())
            done.append(req)
    for req in done:
        req.future.result()
    wall = max(r.finished for r in done) - start
    latencies = [r.finished - r.arrival for r in done]
    queues = [r.started - r.arrival for r in done]
    return summary(latencies, queues, sum(r.weight for r in done), wall)


MODES = {  # mode -> (max batch size, fuse forwards, continuous)
    "off": (1, True, False),
    "invariant": (None, False, False),
    "fused": (None, True, False),
    "continuous": (None, True, True),
}


def compare_modes(args) -> None:
    """Every mode on one loaded pipeline, side by side in this process."""
    import torch

    from ithaca.engine.engine import Engine
    from ithaca.engine.executor import InProcessExecutor, PipelineSpec, load_pipeline
    from ithaca.parallel.state import ParallelState
    from ithaca.types import GenerationParams

    torch.set_num_threads(args.threads)
    w, h = (int(x) for x in args.size.split("x"))
    spec = PipelineSpec(args.direct_model)

    def make(i: int) -> GenerationParams:
        return GenerationParams(args.prompt, width=w, height=h, num_inference_steps=args.steps,
                                seed=i)  # fmt: skip

    modes = args.modes.split(",")
    if args.group_usp:
        row, close = _group_rows(args, spec, modes, make)
    else:
        pipe = load_pipeline(spec, ParallelState.single())
        pipe.generate([make(0)])  # warm-up

        def row(mode: str, arrivals, concurrency: int) -> dict:
            size, fuse, continuous = MODES[mode]
            pipe.fuse_batches = fuse
            engine = Engine(
                [InProcessExecutor(spec, pipeline=pipe)],
                max_queue_size=max(64, 2 * args.requests),
                max_batch_size=size or args.max_batch_size,
                batch_wait_ms=args.batch_wait_ms,
                continuous=continuous,
            )
            engine.start()
            r = run_engine(engine, make, arrivals, concurrency, args.requests)
            engine.shutdown()
            return r

        def close() -> None:
            pass

    where = f"worker group of {args.group_usp} ranks (Ulysses)" if args.group_usp else "in process"
    print(f"{where}, {args.size}, {args.steps} steps, {args.requests} requests per row, "
          f"max batch {args.max_batch_size}, {args.threads} torch threads", flush=True)  # fmt: skip
    print("| mode | load | images/s | p50 s | p99 s | queue p50 s | queue p99 s |")
    print("|---|---|---:|---:|---:|---:|---:|", flush=True)
    try:
        _rows(args, modes, row)
    finally:
        close()


def _group_rows(args, spec, modes: list[str], make):
    """One worker group (started once, warmed up) behind one engine; each mode is the
    engine's setting (max batch size, continuous), so every row runs on the same ranks."""
    import dataclasses

    from ithaca.config import ParallelConfig
    from ithaca.engine.engine import Engine
    from ithaca.engine.group import WorkerGroupExecutor

    if "invariant" in modes:
        raise SystemExit("--group-usp: mode 'invariant' is a start-up flag; run it alone")
    parallel = ParallelConfig(ulysses_degree=args.group_usp)
    group = WorkerGroupExecutor(dataclasses.replace(spec, parallel=parallel))
    engine = Engine([group], max_queue_size=max(64, 2 * args.requests),
                    batch_wait_ms=args.batch_wait_ms)  # fmt: skip
    engine.start()
    engine.generate(make(0))  # warm-up

    def row(mode: str, arrivals, concurrency: int) -> dict:
        size, _, continuous = MODES[mode]
        engine.scheduler.max_batch_size = size or args.max_batch_size
        engine.continuous = continuous
        return run_engine(engine, make, arrivals, concurrency, args.requests)

    return row, engine.shutdown


def _rows(args, modes: list[str], run) -> None:
    def row(mode: str, load: str, arrivals, concurrency: int) -> dict:
        r = run(mode, arrivals, concurrency)
        print(f"| {mode} | {load} | {r['throughput']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} "
              f"| {r['q50']:.2f} | {r['q99']:.2f} |", flush=True)  # fmt: skip
        return r

    capacity = 0.0  # the best closed-loop images/s of the --capacity mode(s)
    for mode in modes:
        for c in [int(x) for x in args.concurrency.split(",") if x]:
            r = row(mode, f"closed, concurrency {c}", None, c)
            if mode != "off" and args.capacity in ("best", mode):
                capacity = max(capacity, r["throughput"])
    rate = args.rate if args.rate > 0 else -args.rate * capacity
    if rate > 0:
        of = "capacity" if args.capacity == "best" else f"{args.capacity} capacity"
        label = f"Poisson {rate:.2f}/s" + (f" ({-args.rate:g} x {of})" if args.rate < 0 else "")
        arrivals = arrival_times(rate, args.requests, seed=args.seed)
        for mode in modes:
            row(mode, label, arrivals, 0)


async def main_async(args) -> None:
    body = {"prompt": args.prompt, "size": args.size, "num_inference_steps": args.steps}
    if args.model:
        body["model"] = args.model
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(
        base_url=args.url, timeout=600, headers=headers, limits=limits
    ) as client:
        await client.post("/v1/images/generations", json=body)  # warm-up
        if args.rate:
            r = await open_loop_http(client, body, args.rate, args.requests)
            print(f"\nPoisson {args.rate:g} requests/s, {r['ok']} ok: {r['throughput']:.2f} "
                  f"images/s, p50 {r['p50']:.3f} s, p99 {r['p99']:.3f} s, queue p50 "
                  f"{r['q50']:.3f} s, p99 {r['q99']:.3f} s")  # fmt: skip
        rows = []
        for c in [int(x) for x in args.concurrency.split(",") if x]:
            rows.append(await sweep_level(client, body, c, args.requests))
        if not rows:
            return
        print(
            f"\nserver {args.url}, {args.size}, {args.steps} steps, {args.requests} requests/level"
        )
        print("| concurrency | ok | failed | images/s | p50 s | p99 s | mean batch |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['concurrency']} | {r['ok']} | {r['failed']} | {r['throughput']:.2f} "
                f"| {r['p50']:.3f} | {r['p99']:.3f} | {r['mean_batch']:.2f} |"
            )
        solo = rows[0]["splits"] if rows[0]["concurrency"] == 1 else []
        if solo:
            c_med, e_med, p_med = (statistics.median(x) for x in zip(*solo, strict=True))
            total = 1000 * statistics.median(c - p for c, _, p in solo)
            edge = 1000 * statistics.median(c - e for c, e, _ in solo)
            hop = 1000 * statistics.median(e - p for _, e, p in solo)
            print(
                f"\nconcurrency 1, medians over {len(solo)} requests: client {c_med:.4f} s, "
                f"engine {e_med:.4f} s, pipeline.generate {p_med:.4f} s\n"
                f"overhead over the pipeline call on the same request: {total:.1f} ms "
                f"(HTTP edge + encoding {edge:.1f} ms, engine queue + socket hop {hop:.1f} ms)"
            )
        if args.direct:
            o = await overhead(client, body, args.direct_model, args.direct_reps)
            print(
                f"\ndirect pipeline.generate p50 {o['direct']:.3f} s, HTTP p50 {o['http']:.3f} s "
                f"({args.direct_reps} alternating pairs): overhead (median of pair differences) "
                f"{1000 * o['diff']:.1f} ms ({100 * o['diff'] / o['direct']:.1f} %)"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8091")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model field of the requests")
    p.add_argument("--prompt", default="a red cat on a blue mat")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--direct", action="store_true", help="also time a direct pipeline call")
    p.add_argument("--direct-model", default=None, help="model for --direct (default: embedded)")
    p.add_argument("--direct-reps", type=int, default=10)
    p.add_argument("--rate", type=float, default=0.0,
                   help="Poisson arrivals, requests/s; with --modes, a negative value is a "
                        "fraction of the closed-loop capacity (--capacity; -0.9: 90%% of "
                        "it)")  # fmt: skip
    p.add_argument("--capacity", default="best",
                   help="--modes with a negative --rate: the capacity it is a fraction "
                        "of: 'best' (the best closed loop of the batching modes) or a "
                        "mode's")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--modes", default=None,
                   help="in process, side by side: off,invariant,fused,continuous")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=8, help="--modes: engine batch cap")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="--modes: engine wait")
    p.add_argument("--threads", type=int, default=2, help="--modes: torch threads")
    p.add_argument(
        "--group-usp",
        type=int,
        default=0,
        help="--modes on a torchrun worker group of this many Ulysses ranks",
    )
    args = p.parse_args()
    if args.modes:
        compare_modes(args)
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
