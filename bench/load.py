"""Load benchmark of the REST service (one run, one table).

Starts ``synthehr serve`` (and, with Redis, one ``synthehr worker``) on this machine, then:

* single-patient ``POST /v1/patients`` at 1, 16 and 64 concurrent clients for ``--seconds``
  each: throughput, p50 and p99 latency;
* a ``--cohort``-patient cohort end to end: ``POST /v1/cohorts``, poll, download as NDJSON;
* the API process's peak RSS (VmHWM).

Targets (on the demo bundle, 2 cores): p50 <= 20 ms and p99 <= 100 ms at 16 clients; 10,000
patients within 30 s; API RSS <= 500 MB.

    .venv/bin/python bench/load.py --bundle models/demo [--redis redis://127.0.0.1:6379/0]

Only loopback traffic; every loop is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def hammer(base: str, clients: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    body = {"n": 1, "age": 60, "sex": "F"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        async def one(k: int) -> None:
            nonlocal errors
            i = 0
            while time.perf_counter() < deadline and len(latencies) < max_requests:
                started = time.perf_counter()
                r = await client.post("/v1/patients", json={**body, "seed": k * 1_000_003 + i})
                latencies.append(time.perf_counter() - started)
                errors += r.status_code != 200
                i += 1

        for k in range(min(clients, 4)):  # warm-up
            await client.post("/v1/patients", json={**body, "seed": k})
        started = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / wall,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def cohort(base: str, size: int, timeout: float) -> dict:
    spec = {"size": size, "age": {"min": 0, "max": 90}, "female_fraction": 0.5,
            "seed": int(time.time())}  # a fresh seed: never a cache hit
    with httpx.Client(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        r = client.post("/v1/cohorts", json=spec)
        r.raise_for_status()
        job = r.json()["id"]
        deadline = started + timeout
        while time.perf_counter() < deadline:
            status = client.get(f"/v1/cohorts/{job}").json()
            if status["status"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.1)
        generated = time.perf_counter() - started
        lines = 0
        with client.stream("GET", f"/v1/cohorts/{job}/result?format=ndjson") as resp:
            for line in resp.iter_lines():
                lines += bool(line)
        total = time.perf_counter() - started
    return {"status": status["status"], "patients": lines, "generate_s": generated,
            "total_s": total}


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"),
                        help="Redis URL: API + one separate worker (default: embedded store)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--cohort", type=int, default=10_000)
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: synthehr train --preset demo --out "
                         f"{args.bundle}")

    port = free_port()
    prefix = f"synthehr-bench:{os.getpid()}"
    env = {**os.environ, "SYNTHEHR_BUNDLE": str(args.bundle), "SYNTHEHR_KEY_PREFIX": prefix,
           "SYNTHEHR_RATE_LIMIT_PER_MINUTE": "0", "SYNTHEHR_LOG_LEVEL": "WARNING"}
    env.pop("REDIS_URL", None)
    if args.redis:
        env["REDIS_URL"] = args.redis
    procs = [subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                              cwd=ROOT, env=env)]
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_ready(base, procs[0])
        if args.redis:
            procs.append(subprocess.Popen([sys.executable, "-m", "app.cli", "worker"],
                                          cwd=ROOT, env=env))
        for clients in (int(c) for c in args.clients.split(",")):
            res = asyncio.run(hammer(base, clients, args.seconds, 200_000))
            rows.append((f"POST /v1/patients (1 patient), {clients} clients",
                         f"{res['rps']:.0f} req/s", f"{res['p50_ms']:.1f}", f"{res['p99_ms']:.1f}",
                         f"{res['requests']} requests, {res['errors']} errors"))
        res = cohort(base, args.cohort, timeout=300)
        rows.append((f"cohort of {args.cohort:,} end to end "
                     f"({'redis + 1 worker' if args.redis else 'embedded worker'})",
                     f"{res['total_s']:.1f} s", "", "",
                     f"{res['status']}, {res['patients']:,} patients, generated in "
                     f"{res['generate_s']:.1f} s, {args.cohort / res['total_s']:.0f} patients/s"))
        rows.append(("API process peak RSS", f"{peak_rss_mb(procs[0].pid):.0f} MB", "", "",
                     f"bundle {args.bundle.name}"))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.redis:
            import redis

            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=f"{prefix}:*"))
            if keys:
                client.delete(*keys)
    print(f"\nsynthehr load benchmark - {os.cpu_count()} CPUs, bundle {args.bundle}\n")
    print("| measurement | throughput / time | p50 ms | p99 ms | notes |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
