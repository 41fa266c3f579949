"""Cohort jobs against a real Redis: store semantics, the job lifecycle through the API with a
separate worker, cached results, a worker killed mid-job, and Redis restarted mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_service_support import (
    MAIN_REDIS,
    ROOT,
    PrivateRedis,
    delete_prefix,
    redis_or_skip,
    session_generator,
    tiny_bundle,
    unique_prefix,
    wait_for,
)

from app.service.api import create_app
from app.service.jobs import chunk_plan, job_id_for, new_record
from app.service.schemas import CohortSpec
from app.service.store import EmbeddedStore, RedisStore, TooManyJobs
from app.service.worker import Worker, start_thread
from app.settings import Settings


@pytest.fixture
def prefix(request):
    client = redis_or_skip()
    name = unique_prefix(request.node.name[:40])
    yield name
    delete_prefix(client, name)


def settings_for(url: str | None, prefix: str, **kw) -> Settings:
    base = {"redis_url": url, "key_prefix": prefix, "chunk_size": 20, "lease_s": 1.5,
            "worker_poll_s": 0.05, "generation_batch": 16}
    base.update(kw)
    return Settings(**base)


# -- store semantics (both stores) --------------------------------------------------------------

@pytest.fixture(params=["redis", "embedded"])
def store(request):
    # Only the Redis case asks for Redis: the embedded store's contract runs everywhere.
    if request.param == "redis":
        s = RedisStore(MAIN_REDIS, request.getfixturevalue("prefix"))
    else:
        s = EmbeddedStore()
    yield s
    s.close()


def test_store_chunk_leases_are_shared_exactly_once_and_taken_over(store):
    spec = CohortSpec(size=50, seed=1)
    job = job_id_for(spec, "v1")
    record, created = store.submit(job, new_record(job, spec, "v1", 20, time.time()))
    assert created and record["status"] == "queued" and record["n_chunks"] == "3"
    _, created = store.submit(job, new_record(job, spec, "v1", 20, time.time()))
    assert not created and store.queue_length() == 1
    now = time.time()
    # Three workers share the one job: each claim leases a different chunk.
    assert store.claim("w1", now, 60) == (job, 0, False)
    assert store.claim("w2", now, 60) == (job, 1, False)
    assert store.claim("w3", now, 60) == (job, 2, False)
    assert store.claim("w4", now, 60) is None  # all leased, none expired
    assert store.get(job)["status"] == "running" and store.get(job)["attempts"] == "1"
    assert store.put_chunk(job, 0, b"a", 20, now, 60) == "ok"
    assert store.put_chunk(job, 0, b"a", 20, now, 60) == "ok"  # re-run: overwrite
    assert store.get(job)["done"] == "20" and store.chunk_indices(job) == {0}
    assert store.heartbeat(job, 0, "w1", now) is False  # stored: the lease is gone
    assert store.heartbeat(job, 1, "w1", now) is False  # not w1's lease
    assert store.heartbeat(job, 2, "w3", now + 100) is True
    # w2 stops beating (died): past the lease its chunk goes to the next claim, only it.
    assert store.claim("w4", now + 30, 60) is None
    assert store.claim("w4", now + 120, 60) == (job, 1, True)
    assert store.get(job)["attempts"] == "2" and store.queue_length() == 1
    assert store.heartbeat(job, 1, "w2", now + 120) is False  # w2 lost it
    assert store.claim("w5", now + 120, 60) is None
    # w2 was only slow and stores its chunk anyway: still counted once.
    assert store.put_chunk(job, 1, b"b", 20, now, 60) == "ok"
    assert store.put_chunk(job, 1, b"b", 20, now, 60) == "ok"
    assert store.get(job)["done"] == "40"
    assert store.put_chunk(job, 2, b"c", 10, now, 60) == "done"
    final = store.get(job)
    assert final["status"] == "done" and final["done"] == "50"
    assert [store.get_chunk(job, i) for i in range(3)] == [b"a", b"b", b"c"]
    assert store.queue_length() == 0 and store.claim("w1", now + 999, 1) is None
    assert store.cancel(job, time.time(), 60) is False  # already done


def test_store_serves_the_oldest_job_first_then_the_next(store):
    jobs = []
    for seed in (11, 12):
        spec = CohortSpec(size=30, seed=seed)
        job = job_id_for(spec, "v1")
        store.submit(job, new_record(job, spec, "v1", 20, time.time()))
        jobs.append(job)
    now = time.time()
    claims = [store.claim(f"w{i}", now, 60) for i in range(5)]
    assert [(c.job_id, c.index) for c in claims[:4]] == [
        (jobs[0], 0), (jobs[0], 1), (jobs[1], 0), (jobs[1], 1)]
    assert claims[4] is None
    assert store.cancel(jobs[0], now, 60) and store.queue_length() == 1
    assert store.heartbeat(jobs[0], 0, "w0", now) is False  # cancelled: lease lost
    assert store.put_chunk(jobs[0], 0, b"x", 20, now, 60) == "cancelled"
    # Resubmitted after the cancel: every chunk is free again.
    spec = CohortSpec(size=30, seed=11)
    assert store.submit(jobs[0], new_record(jobs[0], spec, "v1", 20, now))[1]
    assert store.claim("w9", now, 60) == (jobs[0], 0, False)
    for job in jobs:
        store.cancel(job, now, 60)


def test_store_cancel_and_resubmit(store):
    spec = CohortSpec(size=5, seed=2)
    job = job_id_for(spec, "v1")
    store.submit(job, new_record(job, spec, "v1", 20, time.time()))
    assert store.cancel(job, time.time(), 60)
    assert store.claim("w", time.time(), 60) is None
    assert store.put_chunk(job, 0, b"x", 5, time.time(), 60) == "cancelled"
    _, created = store.submit(job, new_record(job, spec, "v1", 20, time.time()))
    assert created and store.get(job)["status"] == "queued"
    store.cancel(job, time.time(), 60)


def test_store_client_limit_counts_unfinished_jobs(store):
    jobs = []
    for seed in (1, 2, 3):
        spec = CohortSpec(size=5, seed=seed)
        jobs.append((job_id_for(spec, "v1"), spec))
    for job, spec in jobs[:2]:
        _, created = store.submit(job, new_record(job, spec, "v1", 20, time.time()),
                                  client="addr:1.2.3.4", max_active=2)
        assert created
    job, spec = jobs[2]
    with pytest.raises(TooManyJobs) as refused:
        store.submit(job, new_record(job, spec, "v1", 20, time.time()),
                     client="addr:1.2.3.4", max_active=2)
    assert refused.value.active == 2 and store.get(job) is None
    # Another client, or no limit, is not affected; a finished job frees its place.
    assert store.submit(job, new_record(job, spec, "v1", 20, time.time()),
                        client="addr:5.6.7.8", max_active=2)[1]
    store.cancel(job, time.time(), 60)
    store.cancel(jobs[0][0], time.time(), 60)
    assert store.submit(job, new_record(job, spec, "v1", 20, time.time()),
                        client="addr:1.2.3.4", max_active=2)[1]
    for job, _ in jobs:
        store.cancel(job, time.time(), 60)


def test_store_worker_presence_and_result_retention(store):
    now = time.time()
    assert store.live_workers(now, 5) == 0
    store.worker_seen("w1", now - 10)
    store.worker_seen("w2", now - 1)
    assert store.live_workers(now, 5) == 1 and store.live_workers(now, 20) == 2
    spec = CohortSpec(size=30, seed=8)
    job = job_id_for(spec, "v1")
    store.submit(job, new_record(job, spec, "v1", 20, now))
    assert store.retain(job, 2, 600) is False  # not done: chunks missing
    store.claim("w", now, 60)
    store.put_chunk(job, 0, b"a", 20, now, 60)
    assert store.put_chunk(job, 1, b"b", 10, now, 60) == "done"
    assert store.retain(job, 2, 600) is True
    if isinstance(store, RedisStore):  # the download's grace period replaced a shorter TTL
        assert store.client.ttl(store._job(job)) > 500
        assert store.client.ttl(store._chunks(job)) > 500
        store.client.hdel(store._chunks(job), "1")
    else:
        assert store._expiry[job] > time.time() + 500
        del store._chunks[job][1]
    assert store.retain(job, 2, 600) is False  # a chunk is gone: refused before any byte


def test_chunk_plan_is_deterministic():
    spec = CohortSpec(size=100, seed=4, age={"min": 20, "max": 30}, female_fraction=0.25)
    assert chunk_plan(spec, 1, 40) == chunk_plan(spec, 1, 40)
    assert chunk_plan(spec, 1, 40) != chunk_plan(spec, 0, 40)
    rows = [d for i in range(3) for d in chunk_plan(spec, i, 40)]
    assert len(rows) == 100 and all(20 <= a <= 30 for a, _ in rows)
    assert 10 <= sum(s == "F" for _, s in rows) <= 45


# -- API + separate worker over Redis ----------------------------------------------------------

def wait_status(client, job_id, statuses=("done", "failed", "cancelled"), timeout=60):
    def check():
        body = client.get(f"/v1/cohorts/{job_id}").json()
        return body if body["status"] in statuses else None

    return wait_for(check, timeout, 0.05, f"job {job_id} in {statuses}")


def test_lifecycle_through_redis_and_cache_across_processes(prefix):
    gen = session_generator()
    settings = settings_for("redis://127.0.0.1:6379/0", prefix)
    stop = threading.Event()
    worker = Worker(RedisStore(settings.redis_url, prefix), gen, settings, name="t-worker")
    thread = start_thread(worker, stop)
    try:
        spec = {"size": 70, "age": 44, "female_fraction": 1.0, "seed": 21}
        with TestClient(create_app(settings, generator=gen)) as api:
            assert api.get("/ready").json()["store"] == "redis"
            r = api.post("/v1/cohorts", json=spec)
            assert r.status_code == 202 and not r.json()["cached"]
            job = r.json()["id"]
            status = wait_status(api, job)
            assert status["status"] == "done" and status["progress"]["done"] == 70
            first = api.get(f"/v1/cohorts/{job}/result?format=ndjson").content
            patients = [json.loads(x) for x in first.decode().splitlines()]
            assert len(patients) == 70 and {p["sex"] for p in patients} == {"F"}
            assert len({p["patient_id"] for p in patients}) == 70
        # A second API process (fresh app, same Redis) finds the cached job and bytes.
        with TestClient(create_app(settings, generator=gen)) as api2:
            again = api2.post("/v1/cohorts", json=spec).json()
            assert again["id"] == job and again["cached"] and again["status"] == "done"
            assert api2.get(f"/v1/cohorts/{job}/result?format=ndjson").content == first
        ttl = redis_or_skip().ttl(f"{prefix}:job:{job}")
        assert 0 < ttl <= settings.cache_ttl_s
    finally:
        stop.set()
        thread.join(10)


def _spawn_worker(url: str, prefix: str, delay: float, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": url, "SYNTHEHR_KEY_PREFIX": prefix,
           "SYNTHEHR_LEASE_S": "1.5", "SYNTHEHR_WORKER_POLL_S": "0.05",
           "SYNTHEHR_TEST_DELAY": str(delay), "PYTHONPATH": str(ROOT),
           "SYNTHEHR_TEST_NO_TRAIN": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "test_service_support.py")],
                            env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _reference(spec: dict, chunk: int = 20) -> bytes:
    """The same cohort generated uninterrupted, in process (embedded store)."""
    gen = session_generator()
    settings = settings_for(None, "ref", chunk_size=chunk)
    with TestClient(create_app(settings, generator=gen, store=EmbeddedStore())) as api:
        job = api.post("/v1/cohorts", json=spec).json()["id"]
        wait_status(api, job)
        return api.get(f"/v1/cohorts/{job}/result?format=ndjson").content


def test_worker_killed_mid_job_is_resumed_exactly_once(prefix, tmp_path):
    gen = session_generator()
    settings = settings_for("redis://127.0.0.1:6379/0", prefix)
    spec = {"size": 200, "age": {"min": 30, "max": 70}, "seed": 33}
    log_path = tmp_path / "workers.log"
    first = _spawn_worker(settings.redis_url, prefix, 0.15, log_path)
    second = None
    try:
        with TestClient(create_app(settings, generator=gen)) as api:
            job = api.post("/v1/cohorts", json=spec).json()["id"]
            wait_for(lambda: 0 < api.get(f"/v1/cohorts/{job}").json()["progress"]["done"] < 200,
                     60, 0.02, "progress mid-job")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            killed_at = api.get(f"/v1/cohorts/{job}").json()
            assert killed_at["status"] == "running" and killed_at["progress"]["done"] < 200
            second = _spawn_worker(settings.redis_url, prefix, 0.0, log_path)
            status = wait_status(api, job, timeout=90)
            assert status["status"] == "done", (status, log_path.read_text()[-2000:])
            assert status["progress"] == {"done": 200, "total": 200}
            # The killed worker held one chunk's lease (unless killed in the few ms between
            # storing a chunk and leasing the next): the survivor took it over, once.
            takeovers = log_path.read_text().count("chunk re-queued")
            assert takeovers <= 1 and status["attempts"] == 1 + takeovers
            result = api.get(f"/v1/cohorts/{job}/result?format=ndjson").content
        rows = [json.loads(x) for x in result.decode().splitlines()]
        assert len(rows) == 200 and len({r["patient_id"] for r in rows}) == 200
        assert result == _reference(spec)  # nothing lost, nothing duplicated, same patients
    finally:
        _stop(first)
        if second is not None:
            _stop(second)


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_mid_job(tmp_path, persistent):
    gen = session_generator()
    redis = PrivateRedis(tmp_path, persistent=persistent)
    redis.start()
    prefix = "synthehr-fault"
    settings = settings_for(redis.url, prefix)
    spec = {"size": 160, "age": 60, "seed": 44}
    log_path = tmp_path / "worker.log"
    worker = _spawn_worker(redis.url, prefix, 0.1, log_path)
    try:
        with TestClient(create_app(settings, generator=gen)) as api:
            job = api.post("/v1/cohorts", json=spec).json()["id"]
            wait_for(lambda: 0 < api.get(f"/v1/cohorts/{job}").json()["progress"]["done"] < 160,
                     60, 0.02, "progress mid-job")
            redis.stop()
            down = api.get(f"/v1/cohorts/{job}")
            assert down.status_code == 503 and "unreachable" in down.text
            assert api.get("/ready").status_code == 503
            time.sleep(0.5)
            redis.start()
            if persistent:
                # Survived: the worker reconnects and the job completes exactly.
                status = wait_status(api, job, timeout=90)
                assert status["status"] == "done", (status, log_path.read_text()[-2000:])
                assert status["progress"] == {"done": 160, "total": 160}
                rows = api.get(f"/v1/cohorts/{job}/result?format=ndjson").content
                assert rows == _reference(spec)
            else:
                # Lost with the store: reported as unknown (404 saying why), never "done".
                r = api.get(f"/v1/cohorts/{job}")
                assert r.status_code == 404 and "persistence" in r.text
                # Re-submitting recomputes it in full.
                again = api.post("/v1/cohorts", json=spec).json()
                assert again["id"] == job and not again["cached"]
                status = wait_status(api, job, timeout=90)
                assert status["status"] == "done" and status["progress"]["done"] == 160
            assert api.get("/ready").status_code == 200
        assert "store unreachable" in log_path.read_text()
    finally:
        _stop(worker)
        redis.stop(hard=True)


def test_worker_cli_processes_a_job_and_stops_on_sigterm(prefix, tmp_path):
    bundle = tiny_bundle()
    if bundle is None:
        pytest.skip("no ONNX bundle could be built here (the trainer is missing)")
    settings = settings_for("redis://127.0.0.1:6379/0", prefix, bundle=bundle)
    env = {**os.environ, "REDIS_URL": settings.redis_url, "SYNTHEHR_KEY_PREFIX": prefix,
           "SYNTHEHR_BUNDLE": str(bundle)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with TestClient(create_app(settings)) as api:
            job = api.post("/v1/cohorts", json={"size": 30, "seed": 5}).json()["id"]
            status = wait_status(api, job, timeout=60)
            assert status["status"] == "done"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out.decode()[-2000:]
        lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
        assert any(x["msg"] == "job finished" for x in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
