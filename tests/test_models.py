"""Several bundles in one service (``SYNTHEHR_BUNDLES``): listing, picking one by ``model``,
cache keys per bundle, one worker for all (two tiny real bundles, real loading)."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient
from test_service_support import BUNDLE_CACHE, tiny_bundle, wait_for

from app.runtime.bundles import bundle_paths, load_models
from app.service.api import create_app
from app.service.store import EmbeddedStore
from app.settings import Settings

SECOND = BUNDLE_CACHE.parent / "tiny-demo-seed1"


def _second_bundle():
    """A second tiny bundle, trained with another seed (so its patients differ)."""
    from app.runtime.generators import BundleGenerator

    if (SECOND / "manifest.json").is_file():
        try:
            BundleGenerator(SECOND)
            return SECOND
        except Exception:  # noqa: BLE001 - stale cache: rebuild
            shutil.rmtree(SECOND)
    from training.cli.train import run_train

    run_train(out=SECOND, source=None, data=None, preset="demo", size="tiny",
              overrides={"train.max_train_patients": 600}, epochs=1, batch_size=64,
              seed=1, threads=1, progress=False, force=True, export=True)
    return SECOND


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    first = tiny_bundle()
    if first is None:
        pytest.skip("no trainer here to build two bundles")
    root = tmp_path_factory.mktemp("bundles")
    shutil.copytree(first, root / "site-a")
    shutil.copytree(_second_bundle(), root / "site-b")
    return root


@pytest.fixture(scope="module")
def client(sites):
    settings = Settings(redis_url=None, bundles=str(sites), chunk_size=20)
    with TestClient(create_app(settings, store=EmbeddedStore())) as c:
        assert c.get("/ready").status_code == 200, c.get("/ready").text
        yield c


def test_models_lists_every_bundle_default_first(client):
    body = client.get("/v1/models").json()
    assert body["name"] == "site-a" and body["default"] is True
    names = [m["name"] for m in body["models"]]
    assert names == ["site-a", "site-b"]
    versions = [m["bundle_version"] for m in body["models"]]
    assert len(set(versions)) == 2 and body["bundle_version"] == versions[0]
    assert all("train_index" not in m["manifest"] for m in body["models"])


def test_each_bundle_answers_by_name(client):
    ask = {"n": 5, "age": 60, "sex": "F", "seed": 3}
    a = client.post("/v1/patients", json={**ask, "model": "site-a"}).json()
    b = client.post("/v1/patients", json={**ask, "model": "site-b"}).json()
    default = client.post("/v1/patients", json=ask).json()
    assert a["bundle_version"] != b["bundle_version"]
    assert default == a
    assert [p["visits"] for p in a["patients"]] != [p["visits"] for p in b["patients"]]
    bad = client.post("/v1/patients", json={**ask, "model": "site-c"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "model"
    assert "site-a, site-b" in bad.text


def test_cohorts_per_bundle_share_one_worker_and_key_by_bundle(client):
    versions = {m["name"]: m["bundle_version"] for m in client.get("/v1/models").json()["models"]}
    spec = {"size": 30, "seed": 5, "age": {"min": 40, "max": 70}}
    jobs = {}
    for model in ("site-a", "site-b"):
        r = client.post("/v1/cohorts", json={**spec, "model": model})
        assert r.status_code == 202, r.text
        jobs[model] = r.json()
        assert r.json()["bundle_version"] == versions[model]
    assert jobs["site-a"]["id"] != jobs["site-b"]["id"]
    # No model = the default by name: the same job, so the same cache entry.
    assert client.post("/v1/cohorts", json=spec).json()["id"] == jobs["site-a"]["id"]
    results = {}
    for model, job in jobs.items():
        wait_for(lambda j=job["id"]: client.get(f"/v1/cohorts/{j}").json()["status"] == "done",
                 60, 0.05, f"cohort of {model}")
        results[model] = client.get(f"/v1/cohorts/{job['id']}/result").json()
        assert results[model]["bundle_version"] == versions[model]
    assert results["site-a"]["patients"] != results["site-b"]["patients"]
    # The single-bundle service gives the same cohort for site-b's bundle.
    single = Settings(redis_url=None, bundle=client.app.state.service.generator
                      .for_model("site-b").path, chunk_size=20)
    with TestClient(create_app(single, store=EmbeddedStore())) as c:
        job = c.post("/v1/cohorts", json=spec).json()["id"]
        wait_for(lambda: c.get(f"/v1/cohorts/{job}").json()["status"] == "done", 60, 0.05,
                 "single")
        ask = {"n": 1, "age": 50, "sex": "M"}
        assert c.post("/v1/patients", json={**ask, "model": "site-b"}).status_code == 200
        assert c.post("/v1/patients", json={**ask, "model": "site-a"}).status_code == 422
        assert c.get("/v1/models").json()["name"] == "site-b"
        alone = c.get(f"/v1/cohorts/{job}/result").json()["patients"]
        assert _codes(alone) == _codes(results["site-b"]["patients"])  # (ids and dates
        # follow the job id, which names the model here)


def _codes(patients: list[dict]) -> list[list[list[str]]]:
    return [[[c["code"] for c in v["codes"]] for v in p["visits"]] for p in patients]


def test_bundle_paths_errors(sites, tmp_path):
    assert [p.name for p in bundle_paths(str(sites))] == ["site-a", "site-b"]
    assert bundle_paths(f"{sites / 'site-b'}, {sites / 'site-a'}")[0].name == "site-b"
    with pytest.raises(ValueError, match="no bundle"):
        bundle_paths(str(tmp_path))
    with pytest.raises(ValueError, match="two bundles are named 'site-a'"):
        load_models([sites / "site-a", sites / "site-a"])
