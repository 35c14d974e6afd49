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
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
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
        rows = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            rows.append(await sweep_level(client, body, c, args.requests))
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
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
