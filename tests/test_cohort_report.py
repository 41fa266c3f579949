"""``GET /v1/cohorts/{id}/report`` (app/service/cohort_report.py): a finished cohort against the
bundle's training-split aggregates, as JSON and as a self-contained HTML page that headless
Chromium renders with its charts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import scipy.sparse as sp
from fastapi.testclient import TestClient
from test_service_support import (
    ROOT,
    free_port,
    random_engine_generator,
    session_generator,
    tiny_bundle,
    wait_for,
    wait_until_ready,
)

from app.evaluation import jsd_from_counts
from app.service.api import create_app
from app.service.cohort_report import compare, render_html, tally
from app.service.store import EmbeddedStore
from app.settings import Settings

SPEC = {"size": 60, "age": {"min": 40, "max": 80}, "female_fraction": 0.5, "seed": 11}
N_CHARTS = 7


def test_compare_hand_computed():
    # training split: 4 visits; 250 in 3, 401 in 2, 428 in 1; pairs {250,401}: 2, {250,428}: 1
    reference = {"n_patients": 3, "n_visits": 4, "codes": ["250", "401", "428"],
                 "code_visit_counts": [3, 2, 1], "codes_per_visit": {"1": 1, "2": 3},
                 "visits_per_patient": {"1": 2, "2": 1}, "age_years": {"50": 2, "70": 1},
                 "age_mean": 56.7, "sex": {"F": 2, "M": 1}}
    cooc = sp.csr_matrix(np.array([[0, 2, 1], [2, 0, 0], [1, 0, 0]]))
    cohort = tally([{"age": 52, "sex": "F", "visits": [["250", "401"], ["250"]]},
                    {"age": 71, "sex": "M", "visits": [["V270"]]}])
    doc = compare(cohort, reference, cooc)
    # union 250, 401, 428, V270: train (3, 2, 1, 0), cohort (2, 1, 0, 1)
    assert doc["codes"]["jsd"] == pytest.approx(
        jsd_from_counts(np.array([3, 2, 1, 0]), np.array([2, 1, 0, 1])))
    y = np.array([3, 2, 1, 0]) / 4
    yhat = np.array([2, 1, 0, 1]) / 3
    r2 = 1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2)
    assert doc["codes"]["unigram_r2"] == pytest.approx(r2)
    assert doc["cohort"] == {"n_patients": 2, "n_visits": 3, "distinct_codes": 3}
    assert doc["sex"]["cohort"] == {"F": 0.5, "M": 0.5}
    assert doc["sex"]["train"]["F"] == pytest.approx(2 / 3)
    assert doc["visits_per_patient"]["train"][:2] == pytest.approx([2 / 3, 1 / 3])
    assert doc["codes_per_visit"]["cohort"][:2] == pytest.approx([2 / 3, 1 / 3])
    # KS of codes per visit: CDFs (1/4, 1) vs (2/3, 1) -> 5/12
    assert doc["codes_per_visit"]["ks"] == pytest.approx(5 / 12)
    pairs = {tuple(p["pair"]): p for p in doc["top_pairs"]}
    assert pairs[("250", "401")]["train"] == pytest.approx(2 / 4)
    assert pairs[("250", "401")]["cohort"] == pytest.approx(1 / 3)
    assert pairs[("250", "428")]["cohort"] == 0.0
    chapters = {c["chapter"]: c for c in doc["chapters"]}
    assert chapters["390-459"]["train"] == pytest.approx(3 / 6)  # 401 twice + 428 once
    assert chapters["V01-V91"]["cohort"] == pytest.approx(1 / 4)
    page = render_html("x" * 64, "demo-1", {**doc})
    assert page.count("<svg") == N_CHARTS and "<script" not in page


@pytest.fixture(scope="module")
def client():
    settings = Settings(redis_url=None, chunk_size=25, lease_s=5.0)
    with TestClient(create_app(settings, generator=session_generator(),
                               store=EmbeddedStore())) as c:
        yield c


def _done_job(client) -> str:
    job_id = client.post("/v1/cohorts", json=SPEC).json()["id"]
    wait_for(lambda: client.get(f"/v1/cohorts/{job_id}").json()["status"] == "done", 60,
             what=f"job {job_id}")
    return job_id


def test_report_json_and_html(client):
    gen = session_generator()
    if getattr(gen, "bundle", None) is None:
        pytest.skip("no tiny bundle here: the random-model engine has no training statistics")
    job_id = _done_job(client)
    r = client.get(f"/v1/cohorts/{job_id}/report", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["cohort"]["n_patients"] == 60
    assert doc["reference"]["n_patients"] == gen.bundle.reference_stats["n_patients"]
    assert 0.0 <= doc["codes"]["jsd"] <= 1.0
    assert set(doc) >= {"codes", "chapters", "codes_per_visit", "visits_per_patient", "age",
                        "sex", "top_pairs"}
    assert doc["top_pairs"] and sum(doc["age"]["cohort"]) == pytest.approx(1.0)
    page = client.get(f"/v1/cohorts/{job_id}/report")
    assert page.headers["content-type"].startswith("text/html")
    assert page.text.count("<svg") == N_CHARTS
    assert "http://" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert client.get("/v1/cohorts/" + "0" * 32 + "/report").status_code == 404


def test_report_needs_training_statistics():
    settings = Settings(redis_url=None, chunk_size=25, lease_s=5.0)
    with TestClient(create_app(settings, generator=random_engine_generator(),
                               store=EmbeddedStore())) as c:
        job_id = _done_job(c)
        r = c.get(f"/v1/cohorts/{job_id}/report")
        assert r.status_code == 503 and "reference_stats.json" in r.json()["detail"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--virtual-time-budget=10000"]


def test_report_page_renders_its_charts_in_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium)")
    bundle = tiny_bundle()
    if bundle is None:
        pytest.skip("no bundle could be built here")
    import httpx
    from matplotlib.image import imread

    port = free_port()
    env = {**os.environ, "SYNTHEHR_BUNDLE": str(bundle)}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc)
        job_id = httpx.post(f"{base}/v1/cohorts", json=SPEC).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/cohorts/{job_id}").json()["status"] == "done",
                 60, what=f"job {job_id}")
        url = f"{base}/v1/cohorts/{job_id}/report"
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                                  "--dump-dom", url], check=False, capture_output=True,
                                 timeout=120)
            shot = tmp_path / "report.png"
            subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                            f"--screenshot={shot}", "--window-size=1200,2400", url],
                           check=False, capture_output=True, timeout=120)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = dom.stdout.decode()
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    assert text.count("<svg") == N_CHARTS and 'class="bar"' in text
    assert 'class="point"' in text
    # The rendered page shows the cohort's bars: pixels of its colour (#1f77b4).
    pixels = imread(shot)[..., :3]
    blue = np.all(np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.03, axis=-1)
    assert blue.sum() > 500, blue.sum()
