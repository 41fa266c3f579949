"""The service's edges as a new user meets them: non-finite numbers, odd API keys, the rate
limit's key, the work budget, timeouts and clients that leave, per-client cohort limits, paths
in responses, unknown codes, cohorts nobody will run, chunking, and results that expire."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_service_support import SlowGenerator, free_port, session_generator, wait_for

from app.runtime.generators import EngineGenerator
from app.service.api import create_app, key_is_valid
from app.service.store import EmbeddedStore
from app.service.worker import Worker, start_thread
from app.settings import Settings


@pytest.fixture(scope="module")
def gen():
    return session_generator()


def make_client(gen, store=None, **overrides) -> TestClient:
    settings = Settings(redis_url=None, chunk_size=overrides.pop("chunk_size", 40),
                        lease_s=overrides.pop("lease_s", 5.0), **overrides)
    return TestClient(create_app(settings, generator=gen, store=store or EmbeddedStore()))


def fields_of(response) -> list[str]:
    assert response.status_code == 422, response.text
    return [d["field"] for d in response.json()["detail"]]


def post_raw(client, path: str, text: str):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


class SlowEngine:
    """The real engine, ``delay`` seconds slower per call and counting them; ``batch_size``
    sets how many patients the service hands it at a time."""

    def __init__(self, inner, delay: float, batch_size: int) -> None:
        self.inner, self.delay, self.batch_size = inner, delay, batch_size
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.generate(*args, **kwargs)


def slow_generator(gen, delay: float = 0.2, batch_size: int = 4):
    engine = SlowEngine(gen.engine, delay, batch_size)
    return EngineGenerator(engine, gen.manifest, gen.bundle_version), engine


# -- non-finite numbers and API keys ------------------------------------------------------------

@pytest.mark.parametrize("path, text, field", [
    ("/v1/patients", '{"n": 1, "age": NaN, "sex": "F"}', "age"),
    ("/v1/patients", '{"n": 1, "age": Infinity, "sex": "F"}', "age"),
    ("/v1/patients", '{"n": 1, "age": 1e400, "sex": "F"}', "age"),
    ("/v1/patients", '{"n": 1e400, "age": 50, "sex": "F"}', "n"),
    ("/v1/patients", '{"n": 1, "age": 50, "sex": "F", "seed": -Infinity}', "seed"),
    ("/v1/patients", '{"patients": [{"age": NaN, "sex": "F"}]}', "patients.0.age"),
    ("/v1/patients", '{"n": 1, "age": 50, "sex": "F", "params": {"temperature": NaN}}',
     "params"),
    ("/v1/cohorts", '{"size": 5, "female_fraction": NaN}', "female_fraction"),
    ("/v1/cohorts", '{"size": 5, "params": {"alpha": Infinity}}', "params"),
    ("/v1/cohorts", '{"size": 5, "age": {"bins": [{"min": 1, "max": 2, "weight": 1e400}]}}',
     None),
])
def test_non_finite_numbers_get_422(gen, path, text, field):
    with make_client(gen) as c:
        r = post_raw(c, path, text)
        assert r.status_code == 422, r.text
        json.loads(r.text)  # a body JSON can read (it cannot carry NaN)
        if field is not None:
            assert field in fields_of(r)


def test_non_ascii_api_key_is_401_and_a_non_ascii_key_works(gen):
    with make_client(gen, api_key="s3cret") as c:
        for raw in ("clé".encode(), "clé".encode("latin-1"), b"\xff\xfe"):
            assert c.get("/v1/codes/4019", headers={"X-API-Key": raw}).status_code == 401
    with make_client(gen, api_key="sécret") as c:
        assert c.get("/v1/codes/4019", headers={"X-API-Key": "sécret".encode()}
                     ).status_code == 200
    # The same text in Latin-1 (how the server reads header bytes) is a different key.
    assert not key_is_valid("s\xe9cret", "sécret") and key_is_valid(b"s\xc3\xa9cret", "sécret")


def test_rate_limit_keys_on_the_client_not_the_raw_header(gen):
    # No key configured: the header means nothing, so rotating it does not escape the limit.
    with make_client(gen, rate_limit_per_minute=60, rate_limit_burst=3) as c:
        codes = [c.get("/v1/codes/4019", headers={"X-API-Key": f"k{i}"}).status_code
                 for i in range(6)]
        assert codes[:3] == [200] * 3 and codes[3:] == [429] * 3
    # A key configured: invalid keys are counted on the address; the valid key has its own
    # bucket, which the address's refusals do not touch.
    with make_client(gen, api_key="good", rate_limit_per_minute=60, rate_limit_burst=3) as c:
        codes = [c.get("/v1/codes/4019", headers={"X-API-Key": f"bad{i}"}).status_code
                 for i in range(5)]
        assert codes[:3] == [401] * 3 and codes[3:] == [429] * 2
        good = [c.get("/v1/codes/4019", headers={"X-API-Key": "good"}).status_code
                for _ in range(4)]
        assert good == [200, 200, 200, 429]


# -- the work budget, timeouts, clients that leave ----------------------------------------------

def test_work_budget_refuses_with_the_fields_named(gen):
    with make_client(gen) as c:
        r = c.post("/v1/patients", json={"n": 100, "age": 50, "sex": "F", "strategy": "rerank",
                                          "params": {"candidates": 64}})
        assert fields_of(r) == ["n", "params.candidates"] and "6400 rows" in r.text
        r = c.post("/v1/patients", json={"patients": [{"age": 50, "sex": "F"}] * 100,
                                          "strategy": "rerank", "params": {"candidates": 11}})
        assert fields_of(r) == ["patients", "params.candidates"]
        r = c.post("/v1/patients", json={"n": 100, "age": 50, "sex": "F",
                                          "strategy": "retrieve_edit",
                                          "params": {"max_retries": 21}})
        assert fields_of(r) == ["n", "params.max_retries"] and "2100 retries" in r.text
        r = c.post("/v1/patients", json={"n": 1, "age": 50, "sex": "F",
                                          "strategy": "retrieve_edit",
                                          "params": {"max_retries": 1000}})
        assert fields_of(r) == ["params.max_retries"]
        r = c.post("/v1/cohorts", json={"size": 100_000, "strategy": "rerank",
                                         "params": {"candidates": 5}})
        assert fields_of(r) == ["size", "params.candidates"]
        r = c.post("/v1/patients", json={"n": 5, "age": 50, "sex": "F", "strategy": "rerank",
                                          "params": {"candidates": 2}, "seed": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("window_ms", [0.0, 5.0])  # alone, and through the micro-batcher
def test_timeout_answers_504_and_stops_the_generation(gen, window_ms):
    slow, engine = slow_generator(gen, delay=0.2, batch_size=4)  # 40 patients: 10 calls, 2 s
    with make_client(slow, request_timeout_s=0.5, batch_window_ms=window_ms) as c:
        started = time.perf_counter()
        r = c.post("/v1/patients", json={"n": 40, "age": 50, "sex": "F", "seed": 1})
        assert r.status_code == 504 and "request_timeout_s" in r.text
        assert time.perf_counter() - started < 1.5
        time.sleep(0.6)
        calls = engine.calls
        time.sleep(0.6)
        assert engine.calls == calls <= 5, "the engine kept decoding for nobody"


@pytest.mark.parametrize("target", ["any_of", "exclude"])
def test_targeted_request_times_out_and_stops_the_generation(gen, target):
    vocab = gen.engine.vocab
    common = vocab.codes[max(range(len(vocab.codes)), key=lambda i: vocab.counts[i])]
    slow, engine = slow_generator(gen, delay=0.2, batch_size=4)  # 40 patients: 10 calls a try
    with make_client(slow, request_timeout_s=0.5) as c:
        started = time.perf_counter()
        r = c.post("/v1/patients", json={"n": 40, "age": 50, "sex": "F", "seed": 1,
                                          target: [common]})
        assert r.status_code == 504 and "request_timeout_s" in r.text
        assert time.perf_counter() - started < 1.5
        time.sleep(0.6)
        calls = engine.calls
        time.sleep(0.6)
        assert engine.calls == calls <= 5, "the engine kept decoding for nobody"


def test_generation_stops_when_the_client_leaves(gen):
    import uvicorn

    slow, engine = slow_generator(gen, delay=0.2, batch_size=4)
    settings = Settings(redis_url=None, request_timeout_s=60, embedded_workers=0)
    app = create_app(settings, generator=slow, store=EmbeddedStore())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10, what="uvicorn")
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and leaves
            httpx.post(f"http://127.0.0.1:{port}/v1/patients", timeout=0.5,
                       json={"n": 40, "age": 50, "sex": "F", "seed": 1})
        time.sleep(0.6)
        calls = engine.calls
        time.sleep(0.6)
        assert engine.calls == calls <= 6, "the engine kept decoding after the client left"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- cohorts: per-client limit, no worker, chunking, expired results ----------------------------

def test_unfinished_cohorts_per_client_are_limited(gen):
    slow = SlowGenerator(gen, delay=0.5)
    with make_client(slow, max_active_cohorts_per_client=2, chunk_size=5) as c:
        ids = [c.post("/v1/cohorts", json={"size": 50, "seed": s}) for s in (1, 2)]
        assert [r.status_code for r in ids] == [202, 202]
        again = c.post("/v1/cohorts", json={"size": 50, "seed": 1})  # the same job: no new one
        assert again.status_code == 202 and again.json()["id"] == ids[0].json()["id"]
        third = c.post("/v1/cohorts", json={"size": 50, "seed": 3})
        assert third.status_code == 429 and "2 unfinished" in third.json()["detail"]
        assert c.delete(f"/v1/cohorts/{ids[0].json()['id']}").status_code == 200
        third = c.post("/v1/cohorts", json={"size": 50, "seed": 3})
        assert third.status_code == 202
        for r in (ids[1], third):
            c.delete(f"/v1/cohorts/{r.json()['id']}")


def test_a_cohort_with_no_live_worker_is_reported(gen):
    store = EmbeddedStore()
    with make_client(gen, store=store, embedded_workers=0, lease_s=1.0) as c:
        ready = c.get("/ready").json()
        assert ready["workers_alive"] == 0 and ready["cohorts_ready"] is False
        assert "no cohort worker" in ready["cohorts_warning"]
        job = c.post("/v1/cohorts", json={"size": 5, "seed": 1}).json()
        assert job["status"] == "queued" and "no cohort worker" in job["warning"]
        # A worker starts: the warning goes, and the job is done.
        stop = threading.Event()
        thread = start_thread(Worker(store, gen, Settings(redis_url=None, lease_s=1.0,
                                                          worker_poll_s=0.05)), stop)
        wait_for(lambda: c.get("/ready").json()["workers_alive"] == 1, 5, what="presence")
        wait_for(lambda: c.get(f"/v1/cohorts/{job['id']}").json()["status"] == "done", 30,
                 what="job done")
        assert c.get(f"/v1/cohorts/{job['id']}").json()["warning"] is None
        # It stops: within lease_s (1 s) queued jobs and /ready say so again.
        stop.set()
        thread.join(timeout=10)
        other = c.post("/v1/cohorts", json={"size": 5, "seed": 2}).json()["id"]
        wait_for(lambda: c.get(f"/v1/cohorts/{other}").json()["warning"], 2.0,
                 what="the no-worker warning")
        assert c.get("/ready").json()["cohorts_ready"] is False


def cohort_bytes(gen, chunk_size: int, batch: int) -> tuple[str, bytes]:
    with make_client(gen, chunk_size=chunk_size, generation_batch=batch) as c:
        spec = {"size": 60, "seed": 3, "age": {"min": 20, "max": 80}}
        job = c.post("/v1/cohorts", json=spec).json()["id"]
        wait_for(lambda: c.get(f"/v1/cohorts/{job}").json()["status"] == "done", 60,
                 what="job done")
        return job, c.get(f"/v1/cohorts/{job}/result?format=ndjson").content


def test_cohort_bytes_do_not_depend_on_chunk_size_or_generation_batch(gen):
    job_a, a = cohort_bytes(gen, chunk_size=25, batch=64)
    job_b, b = cohort_bytes(gen, chunk_size=7, batch=3)
    assert job_a == job_b
    assert len(a.splitlines()) == 60 and a == b


def test_expired_result_chunk_is_a_clean_410_before_the_body(gen):
    store = EmbeddedStore()
    with make_client(gen, store=store, chunk_size=10, result_grace_s=600) as c:
        job = c.post("/v1/cohorts", json={"size": 30, "seed": 4}).json()["id"]
        wait_for(lambda: c.get(f"/v1/cohorts/{job}").json()["status"] == "done", 60,
                 what="job done")
        # Close to expiry: a download extends it to at least the grace period.
        store._expiry[job] = time.time() + 5
        assert c.get(f"/v1/cohorts/{job}/result").status_code == 200
        assert store._expiry[job] >= time.time() + 590
        del store._chunks[job][1]  # a chunk expired (or the store lost it)
        r = c.get(f"/v1/cohorts/{job}/result?format=csv")
        assert r.status_code == 410 and "expired" in r.json()["detail"]


# -- paths, codes -------------------------------------------------------------------------------

def strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj


def test_no_filesystem_path_in_any_response(gen, tmp_path):
    manifest = {**gen.manifest, "data": {"source": "uci", "path": "/data/hospital/uci-130"},
                "run_config": {"out": "models/uci", "data_dir": "C:\\data\\uci"},
                "metrics": {"val_loss": float("nan")}}
    leaky = EngineGenerator(gen.engine, manifest, gen.bundle_version,
                            {"report": "/srv/reports/uci/report.html"})
    with make_client(leaky) as c:
        body = c.get("/v1/models").json()
        assert not [s for s in strings(body) if "/" in s or "\\" in s]
        assert body["manifest"]["data"]["path"] == "uci-130"
        assert body["manifest"]["metrics"]["val_loss"] is None
    missing = tmp_path / "deep" / "nothing-here"
    with TestClient(create_app(Settings(redis_url=None, bundle=missing),
                               store=EmbeddedStore())) as c:
        error = c.get("/ready").json()["bundle_error"]
        assert "nothing-here" in error and str(tmp_path) not in error and "/" not in error


def test_codes_not_in_cms_v32_are_404(gen):
    with make_client(gen) as c:
        for code in ("8888", "V9099", "E0003"):
            r = c.get(f"/v1/codes/{code}")
            assert r.status_code == 404 and "not in CMS ICD-9-CM v32" in r.json()["detail"]
        assert c.get("/v1/codes/250").json()["category"] == "250"  # a category is a code
        assert c.get("/v1/codes/428.0").json()["code"] == "4280"
        for digits in ("４０１９", "٤٠١٩"):  # fullwidth, Arabic-Indic: never a code
            assert c.get(f"/v1/codes/{digits}").status_code in (404, 422)
