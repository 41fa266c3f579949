"""Load benchmark of the REST service (one run, one table).

Starts ``synthehr serve`` (and, with Redis, one ``synthehr worker``) on this machine, then:

* single-patient ``POST /v1/patients`` at 1, 16 and 64 concurrent clients for ``--seconds``
  each: throughput, p50 and p99 latency;
* a ``--cohort``-patient cohort end to end: ``POST /v1/cohorts``, poll, download as NDJSON;
* the API process's peak RSS (VmHWM);
* first, before any server starts, the engine's own batched throughput on the same bundle and
  ONNX Runtime threads (patients/s of ``generate`` on ``--engine-batch`` single patients of the
  same demographics, best of 3 timed passes of ``--engine-seconds``): each service row then
  says what share of it the service delivers.

Targets (on the demo bundle, 2 cores): at 16 clients >= 80% of the engine's batched throughput
with p99 <= 3x p50; one client p50 <= 10 ms; 10,000 patients within 30 s; API RSS <= 500 MB.

    .venv/bin/python bench/load.py --bundle models/demo [--redis redis://127.0.0.1:6379/0]

``--client raw`` drives the server with a minimal HTTP/1.1 client instead of httpx (whose own
CPU use, on a 2-core box shared with the server, otherwise caps what is measured).
``--batch-window-ms 0,5`` runs the whole benchmark once per value of the API's micro-batching
window (``SYNTHEHR_BATCH_WINDOW_MS``; 0 = off), a fresh server each, in one table: before and
after. ``--cohort 0`` skips the cohort.

Only loopback traffic; every loop is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def hammer_raw(base: str, clients: int, seconds: float, max_requests: int) -> dict:
    """:func:`hammer` with a minimal HTTP/1.1 keep-alive client on asyncio streams.

    httpx costs some 3-5 ms of CPU per request; on a 2-core machine that the load generator
    shares with the server it starves the server and measures itself. This client sends the
    same requests for ~0.1 ms of CPU each.
    """
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def request(reader, writer, seed: int) -> int:
        body = json.dumps({"n": 1, "age": 60, "sex": "F", "seed": seed}).encode()
        writer.write(b"POST /v1/patients HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        return status

    async def one(k: int, warm_up: bool) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            if warm_up:
                await request(reader, writer, k)
                return
            i = 0
            while time.perf_counter() < deadline and len(latencies) < max_requests:
                started = time.perf_counter()
                status = await request(reader, writer, k * 1_000_003 + i)
                latencies.append(time.perf_counter() - started)
                errors += status != 200
                i += 1
        finally:
            writer.close()

    for k in range(min(clients, 4)):  # warm-up
        await one(k, True)
    started = time.perf_counter()
    await asyncio.gather(*(one(k, False) for k in range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / wall,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def engine_throughput(bundle: Path, batch: int, seconds: float) -> float:
    """Patients/s of the engine alone (``generate`` on ``batch`` patients per call, in this
    process, ``SYNTHEHR_ORT_THREADS`` threads as the server): best of 3 passes."""
    from app.runtime.generators import load_generator
    from app.settings import Settings

    gen = load_generator(bundle, Settings().ort_threads)
    demographics = [(60.0, "F")] * batch
    gen.generate(demographics, seed=0)  # warm-up
    best = 0.0
    for attempt in range(3):
        done, seed = 0, 1 + attempt * 100_000
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            done += len(gen.generate(demographics, seed=seed))
            seed += 1
        best = max(best, done / (time.perf_counter() - started))
    return best


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
    parser.add_argument("--cohort", type=int, default=10_000, help="patients; 0: skip")
    parser.add_argument("--batch-window-ms", default="",
                        help="comma list of SYNTHEHR_BATCH_WINDOW_MS values, one server each "
                             "(default: the service's setting)")
    parser.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                        help="load generator: httpx (default) or a minimal keep-alive HTTP/1.1 "
                             "client that leaves the CPU to the server (see hammer_raw)")
    parser.add_argument("--env", action="append", default=[],
                        help="extra SYNTHEHR_X=value for the server (repeatable)")
    parser.add_argument("--engine-batch", type=int, default=64,
                        help="patients per engine call for the engine-alone figure (the "
                             "service's max_batch_patients)")
    parser.add_argument("--engine-seconds", type=float, default=4.0)
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: synthehr train --preset demo --out "
                         f"{args.bundle}")

    engine_pps = engine_throughput(args.bundle, args.engine_batch, args.engine_seconds)
    args.engine_pps = engine_pps
    rows = [(f"engine alone, {args.engine_batch} patients per call",
             f"{engine_pps:.0f} patients/s", "", "",
             f"in process, load avg {os.getloadavg()[0]:.1f}")]
    windows = [w.strip() for w in args.batch_window_ms.split(",") if w.strip()] or [None]
    for window in windows:
        extra = dict(e.split("=", 1) for e in args.env)
        if window is not None:
            extra["SYNTHEHR_BATCH_WINDOW_MS"] = window
        label = "" if window is None else (
            " [batching off]" if float(window) == 0 else f" [batch window {window} ms]")
        rows.extend(run_server(args, extra, label))
    print(f"\nsynthehr load benchmark - {os.cpu_count()} CPUs, bundle {args.bundle}\n")
    print("| measurement | throughput / time | p50 ms | p99 ms | notes |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def run_server(args: argparse.Namespace, extra: dict[str, str], label: str) -> list[tuple]:
    """One server (and worker with Redis): the client levels, the cohort, peak RSS."""
    port = free_port()
    prefix = f"synthehr-bench:{os.getpid()}:{port}"
    env = {**os.environ, "SYNTHEHR_BUNDLE": str(args.bundle), "SYNTHEHR_KEY_PREFIX": prefix,
           "SYNTHEHR_RATE_LIMIT_PER_MINUTE": "0", "SYNTHEHR_LOG_LEVEL": "WARNING", **extra}
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
            load_before = os.getloadavg()[0]
            cpu = cpu_seconds(procs[0].pid)
            drive = hammer_raw if args.client == "raw" else hammer
            res = asyncio.run(drive(base, clients, args.seconds, 200_000))
            cpu_ms = (cpu_seconds(procs[0].pid) - cpu) * 1000 / max(1, res["requests"])
            rows.append(((f"POST /v1/patients (1 patient), {clients} clients{label}"
                         f"{' [raw client]' if args.client == 'raw' else ''}"),
                         f"{res['rps']:.0f} req/s", f"{res['p50_ms']:.1f}", f"{res['p99_ms']:.1f}",
                         (f"{res['rps'] / args.engine_pps:.0%} of the engine, "
                          f"p99/p50 {res['p99_ms'] / res['p50_ms']:.1f}, "
                          f"{res['requests']} requests, {res['errors']} errors, server CPU "
                          f"{cpu_ms:.1f} ms/request, load avg {load_before:.1f}")))
        if args.cohort > 0:
            res = cohort(base, args.cohort, timeout=300)
            rows.append(((f"cohort of {args.cohort:,} end to end "
                         f"({'redis + 1 worker' if args.redis else 'embedded worker'}){label}"),
                         f"{res['total_s']:.1f} s", "", "",
                         (f"{res['status']}, {res['patients']:,} patients, generated in "
                         f"{res['generate_s']:.1f} s, "
                         f"{args.cohort / res['total_s']:.0f} patients/s")))
        rows.append((f"API process peak RSS{label}", f"{peak_rss_mb(procs[0].pid):.0f} MB", "",
                     "", f"bundle {args.bundle.name}"))
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
    return rows


if __name__ == "__main__":
    main()
