"""The REST API in process (embedded store, in-process worker) over the real engine."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile

import pytest
from fastapi.testclient import TestClient
from test_service_support import SlowGenerator, session_generator, wait_for

from app.service.api import create_app
from app.service.store import EmbeddedStore
from app.settings import Settings


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    """Every log call runs (a bad ``extra`` key would raise only when the level is on)."""
    caplog.set_level(logging.DEBUG, logger="synthehr")


@pytest.fixture(scope="module")
def gen():
    return session_generator()


def make_client(gen, **overrides) -> TestClient:
    settings = Settings(redis_url=None, chunk_size=overrides.pop("chunk_size", 40),
                        lease_s=overrides.pop("lease_s", 5.0), **overrides)
    return TestClient(create_app(settings, generator=gen, store=EmbeddedStore()))


@pytest.fixture(scope="module")
def client(gen):
    with make_client(gen) as c:
        yield c


def some_code(gen) -> str:
    """A code the model knows that is valid for a 50-year-old man or woman."""
    for code in ("4019", "25000", "4280", "2724", "42731"):
        if gen.has_code(code):
            return code
    return next(c for c in sorted(gen._codes) if c[0].isdigit() and "401" <= c[:3] <= "459")


def wait_done(client, job_id: str, timeout: float = 60) -> dict:
    def done():
        body = client.get(f"/v1/cohorts/{job_id}").json()
        return body if body["status"] in ("done", "failed", "cancelled") else None

    return wait_for(done, timeout, 0.05, f"job {job_id}")


# -- synchronous patients -----------------------------------------------------------------------

def test_patients_shared_demographics(client, gen):
    r = client.post("/v1/patients", json={"n": 3, "age": 67, "sex": "F", "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bundle_version"] == gen.bundle_version and body["seed"] == 7
    assert len(body["patients"]) == 3
    for p in body["patients"]:
        assert p["age"] == 67 and p["sex"] == "F" and p["patient_id"].startswith("syn-")
        assert p["visits"], "every patient has at least one visit"
        for visit in p["visits"]:
            codes = [c["code"] for c in visit["codes"]]
            assert codes and len(codes) == len(set(codes))
            for c in visit["codes"]:
                assert set(c) == {"code", "category", "chapter", "chapter_title", "description"}
                assert c["code"].startswith(c["category"]) and c["chapter"]


def test_patients_same_seed_same_output_and_per_patient(client, gen):
    req = {"patients": [{"age": 45, "sex": "M"}, {"age": 3, "sex": "F"}], "seed": 11,
           "strategy": "cooccurrence", "params": {"alpha": 0.5}, "validity_mask": True}
    a, b = client.post("/v1/patients", json=req), client.post("/v1/patients", json=req)
    assert a.status_code == 200, a.text
    assert a.content == b.content
    assert [(p["age"], p["sex"]) for p in a.json()["patients"]] == [(45, "M"), (3, "F")]
    c = client.post("/v1/patients", json={**req, "seed": 12})
    assert c.json()["patients"] != a.json()["patients"]


def test_must_include_and_strategies(client, gen):
    code = some_code(gen)
    r = client.post("/v1/patients", json={"n": 4, "age": 50, "sex": "M", "seed": 1,
                                          "must_include": [code], "strategy": "rerank",
                                          "params": {"candidates": 2}})
    assert r.status_code == 200, r.text
    for p in r.json()["patients"]:
        assert code in {c["code"] for v in p["visits"] for c in v["codes"]}
    r = client.post("/v1/patients", json={"n": 2, "age": 50, "sex": "M", "seed": 1,
                                          "validity_mask": False})
    assert r.status_code == 200


def fields_of(response) -> list[str]:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert all(d["msg"] for d in detail)
    return [d["field"] for d in detail]


@pytest.mark.parametrize("body, field", [
    ({"n": 1, "age": 50, "sex": "X"}, "sex"),
    ({"n": 1, "age": 200, "sex": "F"}, "age"),
    ({"n": 1, "age": -1, "sex": "F"}, "age"),
    ({"n": 101, "age": 50, "sex": "F"}, "n"),
    ({"patients": [{"age": 50, "sex": "F"}] * 101}, "patients"),
    ({"n": 1, "age": 50}, "body"),
    ({"patients": [{"age": 50, "sex": "F"}], "age": 3}, "body"),
    ({"patients": [{"age": 50, "sex": "Q"}]}, "patients.0.sex"),
    ({"n": 1, "age": 50, "sex": "F", "strategy": "magic"}, "strategy"),
    ({"n": 1, "age": 50, "sex": "F", "params": {"alpha": 1}}, "params"),
    ({"n": 1, "age": 50, "sex": "F", "params": {"temperature": 0}}, "params"),
    ({"n": 1, "age": 50, "sex": "F", "params": {"max_visits": 10_000}}, "params"),
    ({"n": 1, "age": 50, "sex": "F", "seed": -4}, "seed"),
    ({"n": 1, "age": 50, "sex": "F", "must_include": ["ABC"]}, "must_include"),
    ({"n": 1, "age": 50, "sex": "F", "unknown": 1}, "unknown"),
    ({"n": "many", "age": 50, "sex": "F"}, "n"),
])
def test_patients_bad_input_422_names_field(client, body, field):
    assert field in fields_of(client.post("/v1/patients", json=body))


def test_patients_semantic_422(client, gen):
    # A well-formed code the model never saw, a deployment limit, an impossible constraint.
    unseen = next(c for c in ("0010", "V9109", "E0000", "0020") if not gen.has_code(c))
    assert fields_of(client.post("/v1/patients", json={
        "n": 1, "age": 50, "sex": "F", "must_include": [unseen]})) == ["must_include.0"]
    assert fields_of(client.post("/v1/patients", json={
        "n": 1, "age": 50, "sex": "F", "params": {"max_visits": 999}})) == ["params.max_visits"]
    r = client.post("/v1/patients", content=b"{not json", headers={
        "content-type": "application/json"})
    assert r.status_code == 422


def test_body_size_limit_413(gen):
    with make_client(gen, max_request_bytes=2048) as c:
        r = c.post("/v1/patients", json={"patients": [{"age": 50, "sex": "F"}] * 100})
        assert r.status_code == 413


def test_rate_limit_429(gen):
    with make_client(gen, rate_limit_per_minute=60, rate_limit_burst=3) as c:
        codes = [c.get("/v1/codes/4019").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[-1] == 429
        assert c.get("/health").status_code == 200  # operations are not limited


def test_api_key(gen):
    with make_client(gen, api_key="s3cret") as c:
        assert c.get("/v1/codes/4019").status_code == 401
        assert c.get("/v1/codes/4019", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/codes/4019", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/docs").status_code == 200


# -- model, codes, operations -------------------------------------------------------------------

def test_codes_endpoint(client, gen):
    body = client.get("/v1/codes/250.00").json()
    assert body["code"] == "25000" and body["category"] == "250"
    assert body["chapter"] == "240-279" and body["description"].startswith("Diabetes")
    assert body["in_model_vocabulary"] == gen.has_code("25000")
    assert fields_of(client.get("/v1/codes/I10")) == ["code"]


def walk(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


def test_models_endpoint_has_no_training_records(client, gen):
    body = client.get("/v1/models").json()
    assert body["bundle_version"] == gen.bundle_version
    assert "plain" in body["strategies"] and isinstance(body["manifest"], dict)
    keys = set(walk(body))
    assert not keys & {"train_index", "patients", "records", "visits"}


def test_models_endpoint_shows_the_fitted_temperature_requests_default_to(client, gen):
    from dataclasses import replace

    from app.decoding.calibration import StopCalibration

    engine = gen.engine
    saved = engine.calibration
    assert client.get("/v1/models").json()["default_temperature"] == (
        saved.temperature if saved is not None else 1.0)
    engine.calibration = replace(saved or StopCalibration(), temperature=0.7)
    try:
        body = client.get("/v1/models").json()
        assert body["default_temperature"] == 0.7
        assert body["models"][0]["default_temperature"] == 0.7
        ask = {"n": 3, "age": 60, "sex": "M", "seed": 11}
        fitted = client.post("/v1/patients", json=ask).json()["patients"]
        explicit = client.post("/v1/patients", json={
            **ask, "params": {"temperature": 0.7}}).json()["patients"]
        one = client.post("/v1/patients", json={
            **ask, "params": {"temperature": 1.0}}).json()["patients"]
        assert fitted == explicit and fitted != one
    finally:
        engine.calibration = saved


def test_health_ready_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["store"] == "embedded"
    client.post("/v1/patients", json={"n": 1, "age": 30, "sex": "F", "seed": 1})
    text = client.get("/metrics").text
    assert 'synthehr_http_requests_total{method="POST",route="/v1/patients",status="200"}' in text
    assert "synthehr_patients_generated_total" in text and "synthehr_queue_length" in text


def test_not_ready_without_bundle(tmp_path, caplog):
    settings = Settings(redis_url=None, bundle=tmp_path / "nothing-here")
    with caplog.at_level(logging.INFO, logger="synthehr"), \
            TestClient(create_app(settings, store=EmbeddedStore())) as c:
        r = c.get("/ready")
        assert r.status_code == 503 and not r.json()["bundle_loaded"]
        assert "nothing-here" in r.json()["bundle_error"]
        assert c.post("/v1/patients", json={"n": 1, "age": 3, "sex": "F"}).status_code == 503
        assert c.get("/health").status_code == 200
    assert any("EMBEDDED" in rec.getMessage() for rec in caplog.records)


def test_inference_runs_off_the_event_loop(gen):
    slow = SlowGenerator(gen, delay=1.5)
    with make_client(slow) as c:
        thread = threading.Thread(target=c.post, args=("/v1/patients",), kwargs={
            "json": {"n": 1, "age": 30, "sex": "F", "seed": 1}})
        thread.start()
        time.sleep(0.2)
        started = time.perf_counter()
        assert c.get("/health").status_code == 200
        assert time.perf_counter() - started < 0.5
        thread.join()


def test_docs_assets_are_local(client):
    html = client.get("/docs").text
    assert "swagger-ui-bundle.js" in html and "cdn" not in html.lower()
    assert "https://" not in html.replace("https://fastapi.tiangolo.com", "")
    for url in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css",
                "/static-offline-docs/redoc.standalone.js"):
        assert client.get(url).status_code == 200
    assert "redoc.standalone.js" in client.get("/redoc").text
    schema = client.get("/openapi.json").json()
    assert {"/v1/patients", "/v1/cohorts", "/v1/cohorts/{job_id}", "/v1/cohorts/{job_id}/result",
            "/v1/models", "/v1/codes/{code}"} <= set(schema["paths"])
    assert schema["components"]["schemas"]["PatientsRequest"].get("examples")


# -- cohorts (embedded store, in-process worker) --------------------------------------------------

SPEC = {"size": 90, "age": {"bins": [{"min": 0, "max": 17, "weight": 1},
                                     {"min": 65, "max": 90, "weight": 3}]},
        "female_fraction": 0.3, "strategy": "plain", "seed": 5}


def test_cohort_lifecycle_and_formats(client, gen, tmp_path):
    r = client.post("/v1/cohorts", json=SPEC)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/cohorts/{job_id}"
    status = wait_done(client, job_id)
    assert status["status"] == "done", status
    assert status["progress"] == {"done": 90, "total": 90} and status["elapsed_s"] >= 0
    body = client.get(f"/v1/cohorts/{job_id}/result").json()
    patients = body["patients"]
    assert body["count"] == 90 and len(patients) == 90
    assert len({p["patient_id"] for p in patients}) == 90
    ages = [p["age"] for p in patients]
    assert all(a <= 17 or a >= 65 for a in ages) and sum(a >= 65 for a in ages) > 45
    nd = client.get(f"/v1/cohorts/{job_id}/result?format=ndjson").text.splitlines()
    assert [json.loads(line) for line in nd] == patients
    csv_text = client.get(f"/v1/cohorts/{job_id}/result?format=csv").text
    assert csv_text.splitlines()[0].startswith("patient_id,visit_id,visit_seq,code,age,sex")
    n_codes = sum(len(v["codes"]) for p in patients for v in p["visits"])
    assert len(csv_text.splitlines()) == 1 + n_codes

    # The long CSV reads back with the project's generic loader, the zip with its MIMIC-III one.
    from training.loaders.generic import load_generic
    from training.loaders.mimic3 import load_mimic3

    (tmp_path / "long.csv").write_text(csv_text)
    back = {p.patient_id: p for p in load_generic(tmp_path / "long.csv").patients}
    assert len(back) == 90
    zipped = client.get(f"/v1/cohorts/{job_id}/result?format=mimic3")
    assert zipped.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as zf:
        assert sorted(zf.namelist()) == ["ADMISSIONS.csv", "DIAGNOSES_ICD.csv", "PATIENTS.csv"]
        zf.extractall(tmp_path / "mimic")
    header = (tmp_path / "mimic" / "DIAGNOSES_ICD.csv").read_text().splitlines()[0]
    assert header == "ROW_ID,SUBJECT_ID,HADM_ID,SEQ_NUM,ICD9_CODE"
    corpus = load_mimic3(tmp_path / "mimic")
    assert len(corpus.patients) == 90
    by_n = {int(p["patient_id"].rsplit("-", 1)[1]): p for p in patients}
    for p in corpus.patients:
        src = by_n[int(p.patient_id)]
        assert p.sex == src["sex"] and abs(p.age - src["age"]) < 0.01
        assert [list(v) for v in p.visits] == [[c["code"] for c in v["codes"]]
                                              for v in src["visits"]]


def test_cohort_cache_hit_identical_bytes(client):
    spec = {**SPEC, "seed": 6, "size": 50}
    first = client.post("/v1/cohorts", json=spec)
    job_id = first.json()["id"]
    wait_done(client, job_id)
    a = client.get(f"/v1/cohorts/{job_id}/result?format=csv").content
    again = client.post("/v1/cohorts", json=spec)
    assert again.status_code == 202 and again.json()["id"] == job_id
    assert again.json()["cached"] is True and again.json()["status"] == "done"
    assert again.json()["attempts"] == 1  # not recomputed
    assert client.get(f"/v1/cohorts/{job_id}/result?format=csv").content == a
    other = client.post("/v1/cohorts", json={**spec, "seed": 7}).json()["id"]
    assert other != job_id


def test_cohort_cancel_and_errors(gen):
    slow = SlowGenerator(gen, delay=0.3)
    with make_client(slow, chunk_size=10) as c:
        job_id = c.post("/v1/cohorts", json={**SPEC, "size": 200, "seed": 9}).json()["id"]
        wait_for(lambda: c.get(f"/v1/cohorts/{job_id}").json()["status"] == "running", 10)
        assert c.get(f"/v1/cohorts/{job_id}/result").status_code == 409
        r = c.delete(f"/v1/cohorts/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert c.delete(f"/v1/cohorts/{job_id}").status_code == 409
        time.sleep(0.5)
        assert c.get(f"/v1/cohorts/{job_id}").json()["status"] == "cancelled"
        # A cancelled job can be submitted again (and is recomputed).
        again = c.post("/v1/cohorts", json={**SPEC, "size": 200, "seed": 9}).json()
        assert again["id"] == job_id and again["status"] == "queued" and not again["cached"]
        c.delete(f"/v1/cohorts/{job_id}")
    with make_client(gen) as c:
        assert c.get("/v1/cohorts/" + "0" * 32).status_code == 404
        assert fields_of(c.get("/v1/cohorts/not-a-job")) == ["job_id"]
        assert fields_of(c.post("/v1/cohorts", json={"size": 0})) == ["size"]
        assert fields_of(c.post("/v1/cohorts", json={"size": 100_001})) == ["size"]
        bad = c.post("/v1/cohorts", json={"size": 5, "age": {"min": 9, "max": 1}})
        assert bad.status_code == 422 and "exceeds" in bad.text
        assert fields_of(c.post("/v1/cohorts", json={"size": 5, "female_fraction": 2})
                         ) == ["female_fraction"]
        job = c.post("/v1/cohorts", json={"size": 3, "seed": 1}).json()["id"]
        assert fields_of(c.get(f"/v1/cohorts/{job}/result?format=xml")) == ["format"]


def test_cohort_job_failure_is_reported(gen):
    class Broken(SlowGenerator):
        def generate(self, *args, **kwargs):
            raise RuntimeError("engine exploded")

    with make_client(Broken(gen, 0)) as c:
        job_id = c.post("/v1/cohorts", json={"size": 5, "seed": 2}).json()["id"]
        status = wait_done(c, job_id, 10)
        assert status["status"] == "failed" and "engine exploded" in status["error"]
