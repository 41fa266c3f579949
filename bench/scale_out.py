"""Cohort scale-out benchmark: one cohort timed with 1 worker and with more (one run, one table).

For each worker count, a fresh deployment on this machine: a private ``redis-server`` on a
spare port (stopped by its pid afterwards), ``synthehr serve`` and N ``synthehr worker``
processes, all with ``SYNTHEHR_RESULTS_URL`` set to a temporary folder (so a cohort above
``--inline-max`` patients is written to chunk files, as in deployment). Once the API sees every
worker, the cohort is submitted through ``POST /v1/cohorts`` and timed until ``done``; then it
is downloaded through the API in each ``--download`` format (streamed, bytes counted). Reported:
generation time and patients/s, the speed-up over the first worker count, each worker's CPU
seconds (so contention from other work on the machine shows: CPU time / wall time < 1 means the
worker waited for a core), download times and sizes, and the peak RSS (VmHWM) of every process
(API, each worker, redis-server), plus the load average before and after.

    .venv/bin/python bench/scale_out.py --bundle models/demo --size 100000 --workers 1,2
    .venv/bin/python bench/scale_out.py --size 1000000 --workers 2 --download ndjson,mimic3

Only loopback traffic; every wait is bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from load import cpu_seconds, free_port, peak_rss_mb, wait_ready


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server of our own (no persistence: the benchmark needs none)."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(folder), "--save", "", "--appendonly", "no",
                             "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    for _ in range(200):
        try:
            if client.ping():
                return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("private redis-server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_workers(base: str, n: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = httpx.get(f"{base}/ready", timeout=5).json()
        if body.get("workers_alive", 0) >= n:
            return
        time.sleep(0.2)
    raise SystemExit(f"{n} workers not seen in {timeout:.0f} s")


def run(args: argparse.Namespace, n_workers: int) -> dict:
    """One deployment with ``n_workers`` workers: generate, download, measure."""
    folder = Path(tempfile.mkdtemp(prefix="synthehr-scale-"))
    redis_proc, url = start_redis(folder)
    port = free_port()
    env = {**os.environ, "REDIS_URL": url, "SYNTHEHR_BUNDLE": str(args.bundle),
           "SYNTHEHR_RESULTS_URL": str(folder / "results"),
           "SYNTHEHR_RESULT_INLINE_MAX_PATIENTS": str(args.inline_max),
           "SYNTHEHR_MAX_COHORT_SIZE": str(max(args.size, 100_000)),
           "SYNTHEHR_MAX_COHORT_DECODED_ROWS": str(max(args.size, 400_000)),
           "SYNTHEHR_CHUNK_SIZE": str(args.chunk_size), "SYNTHEHR_ORT_THREADS": "1",
           "SYNTHEHR_RATE_LIMIT_PER_MINUTE": "0", "SYNTHEHR_LOG_LEVEL": "WARNING",
           "OMP_NUM_THREADS": "1"}
    api = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                           cwd=ROOT, env=env)
    workers: list[subprocess.Popen] = []
    base = f"http://127.0.0.1:{port}"
    out: dict = {"workers": n_workers}
    try:
        wait_ready(base, api)
        workers = [subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT,
                                    env=env) for _ in range(n_workers)]
        wait_workers(base, n_workers, 180)
        cpu0 = [cpu_seconds(w.pid) for w in workers]
        out["load_before"] = os.getloadavg()[0]
        spec = {"size": args.size, "age": {"min": 18, "max": 90}, "female_fraction": 0.5,
                "seed": args.seed}
        started = time.perf_counter()
        r = httpx.post(f"{base}/v1/cohorts", json=spec, timeout=30)
        if r.status_code != 202:
            raise SystemExit(f"cohort refused: {r.status_code} {r.text}")
        job = r.json()["id"]
        deadline = time.time() + args.timeout
        while True:
            status = httpx.get(f"{base}/v1/cohorts/{job}", timeout=30).json()
            if status["status"] in ("done", "failed", "cancelled"):
                break
            if time.time() > deadline:
                raise SystemExit(f"cohort not done in {args.timeout} s: {status}")
            time.sleep(0.5)
        out["generate_s"] = time.perf_counter() - started
        out["status"] = status["status"]
        out["load_after"] = os.getloadavg()[0]
        out["worker_cpu_s"] = [cpu_seconds(w.pid) - c for w, c in zip(workers, cpu0,
                                                                      strict=True)]
        out["in_files"] = (folder / "results" / job).is_dir()
        out["downloads"] = []
        for fmt in [f for f in args.download.split(",") if f]:
            t0 = time.perf_counter()
            size = 0
            with httpx.stream("GET", f"{base}/v1/cohorts/{job}/result?format={fmt}",
                              timeout=600) as resp:
                if resp.status_code != 200:
                    raise SystemExit(f"download {fmt}: {resp.status_code}")
                for part in resp.iter_bytes():
                    size += len(part)
            out["downloads"].append((fmt, time.perf_counter() - t0, size))
        out["rss_mb"] = {"api": peak_rss_mb(api.pid), "redis": peak_rss_mb(redis_proc.pid),
                         **{f"worker {i + 1}": peak_rss_mb(w.pid)
                            for i, w in enumerate(workers)}}
    finally:
        for proc in [*workers, api]:
            stop(proc)
        stop(redis_proc)
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--size", type=int, default=100_000, help="patients in the cohort")
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--inline-max", type=int, default=20_000,
                        help="SYNTHEHR_RESULT_INLINE_MAX_PATIENTS for the run")
    parser.add_argument("--download", default="ndjson",
                        help="comma list of formats to download after each run ('' for none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per cohort")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: synthehr train --preset demo --out "
                         f"{args.bundle}")
    results = [run(args, int(n)) for n in args.workers.split(",")]
    first = results[0]
    print(f"\nsynthehr scale-out benchmark - {os.cpu_count()} CPUs, bundle {args.bundle}, "
          f"cohort {args.size:,}, chunk {args.chunk_size}\n")
    print("| workers | generated in | patients/s | speed-up | worker CPU s (CPU/wall) | "
          "load avg before/after | result in | peak RSS MB |")
    print("| ---: | ---: | ---: | ---: | --- | --- | --- | --- |")
    for res in results:
        cpu = ", ".join(f"{c:.0f} ({c / res['generate_s']:.2f})" for c in res["worker_cpu_s"])
        rss = ", ".join(f"{k} {v:.0f}" for k, v in res["rss_mb"].items())
        print(f"| {res['workers']} | {res['generate_s']:.1f} s | "
              f"{args.size / res['generate_s']:.0f} | "
              f"{first['generate_s'] / res['generate_s']:.2f}x | {cpu} | "
              f"{res['load_before']:.1f} / {res['load_after']:.1f} | "
              f"{'files' if res['in_files'] else 'redis'} | {rss} |")
    downloads = [(r["workers"], *d) for r in results for d in r["downloads"]]
    if downloads:
        print("\n| workers | download | time | bytes |")
        print("| ---: | --- | ---: | ---: |")
        for workers, fmt, seconds, size in downloads:
            print(f"| {workers} | {fmt} | {seconds:.1f} s | {size:,} |")


if __name__ == "__main__":
    main()
