"""Cohort targeting (``any_of``, ``exclude``; codes or categories) through the decoder's masks,
and infeasible specs refused with 422 at submission (real engine, tiny real bundle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_service_support import session_generator, wait_for

from app.corpus import Patient
from app.decoding.targeting import TargetError, Targeting
from app.decoding.validity import ValidityMask
from app.icd9.codes import category_of
from app.icd9.edits import load_edits
from app.service.api import create_app
from app.service.store import EmbeddedStore
from app.settings import Settings
from app.vocab import Vocabulary


@pytest.fixture(scope="module")
def gen():
    return session_generator()


@pytest.fixture(scope="module")
def client(gen):
    settings = Settings(redis_url=None, chunk_size=100, max_patients_per_request=500)
    with TestClient(create_app(settings, generator=gen, store=EmbeddedStore())) as c:
        yield c


def _vocab(gen) -> Vocabulary:
    return gen.engine.vocab


def _codes(patient: dict) -> set[str]:
    return {c["code"] for v in patient["visits"] for c in v["codes"]}


def _fields(response) -> list[str]:
    assert response.status_code == 422, response.text
    return [d["field"] for d in response.json()["detail"]]


def _female_only(gen) -> str:
    """A female-only code the model knows, a pregnancy code where it has one."""
    edits = load_edits()
    female = [c for c in _vocab(gen).codes if edits.sex_edits.get(c) == "F"]
    pregnancy = [c for c in female if c.startswith(("63", "64", "65", "66", "67", "V22"))]
    return (pregnancy or female)[0]


def _rare_category(gen) -> str:
    """A category with several codes in the vocabulary, none of them among the commonest."""
    vocab = _vocab(gen)
    by_cat: dict[str, int] = {}
    for code, n in zip(vocab.codes, vocab.counts, strict=True):
        by_cat[category_of(code)] = by_cat.get(category_of(code), 0) + int(n)
    sizes = {cat: sum(1 for c in vocab.codes if category_of(c) == cat) for cat in by_cat}
    return min((cat for cat in by_cat if sizes[cat] >= 2 and cat[0].isdigit()),
               key=lambda cat: by_cat[cat])


def test_any_of_category_reaches_every_patient(client, gen):
    category = _rare_category(gen)
    base = {"n": 200, "age": 60, "sex": "F", "seed": 4}
    plain = client.post("/v1/patients", json=base).json()["patients"]
    hit = sum(any(category_of(c) == category for c in _codes(p)) for p in plain)
    assert hit < 100, "the category is too common for this test to show anything"
    r = client.post("/v1/patients", json={**base, "any_of": [category]})
    assert r.status_code == 200, r.text
    patients = r.json()["patients"]
    assert all(any(category_of(c) == category for c in _codes(p)) for p in patients)
    chosen = {c for p in patients for c in _codes(p) if category_of(c) == category}
    assert len(chosen) >= 2  # the category's codes, not one forced code
    # The rest is still the model's: other codes vary, and the same seed repeats.
    assert len({frozenset(_codes(p)) for p in patients}) > 150
    again = client.post("/v1/patients", json={**base, "any_of": [category]}).json()
    assert again["patients"] == patients


def test_any_of_keeps_patients_that_already_qualify(client, gen):
    """The first rejection try is the untargeted request itself: patients that carry a code
    of the list are returned unchanged, the others are re-drawn from the model."""
    vocab = _vocab(gen)
    common = category_of(vocab.codes[int(np.argmax(vocab.counts))])
    base = {"n": 100, "age": 60, "sex": "M", "seed": 12}
    plain = client.post("/v1/patients", json=base).json()["patients"]
    targeted = client.post("/v1/patients", json={**base, "any_of": [common]}).json()["patients"]
    qualified = [i for i, p in enumerate(plain) if any(category_of(c) == common
                                                       for c in _codes(p))]
    assert 0 < len(qualified) < 100
    assert all(targeted[i]["visits"] == plain[i]["visits"] for i in qualified)
    assert all(any(category_of(c) == common for c in _codes(p)) for p in targeted)
    redrawn = [i for i in range(100) if i not in qualified]
    assert all(targeted[i]["visits"] != plain[i]["visits"] for i in redrawn)


def test_exclude_common_code_never_generated(client, gen):
    vocab = _vocab(gen)
    common = vocab.codes[int(np.argmax(vocab.counts))]
    spec = {"size": 1000, "age": {"min": 30, "max": 85}, "seed": 8}
    runs = {}
    for name, extra in (("plain", {}), ("excluded", {"exclude": [common]})):
        job = client.post("/v1/cohorts", json={**spec, **extra})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        wait_for(lambda j=job_id: client.get(f"/v1/cohorts/{j}").json()["status"] == "done",
                 120, 0.1, "cohort")
        text = client.get(f"/v1/cohorts/{job_id}/result?format=ndjson").text
        runs[name] = [json.loads(line) for line in text.splitlines()]
    assert sum(common in _codes(p) for p in runs["plain"]) > 5  # a tiny, barely trained model
    assert not any(common in _codes(p) for p in runs["excluded"])
    assert len(runs["excluded"]) == 1000
    # Excluding a category removes all of its codes.
    r = client.post("/v1/patients", json={"n": 100, "age": 60, "sex": "M", "seed": 2,
                                          "exclude": [category_of(common)]})
    assert r.status_code == 200, r.text
    assert not any(category_of(c) == category_of(common)
                   for p in r.json()["patients"] for c in _codes(p))


def test_infeasible_specs_are_refused_at_submission(client, gen):
    female_only = _female_only(gen)
    r = client.post("/v1/cohorts", json={"size": 50, "female_fraction": 0.5,
                                         "age": {"min": 20, "max": 40},
                                         "must_include": [female_only]})
    assert _fields(r) == ["must_include"] and "sex M" in r.text
    ok = client.post("/v1/cohorts", json={"size": 5, "female_fraction": 1.0,
                                          "age": {"min": 20, "max": 40},
                                          "must_include": [female_only]})
    assert ok.status_code == 202, ok.text
    common = "4019" if gen.has_code("4019") else _vocab(gen).codes[0]
    r = client.post("/v1/cohorts", json={"size": 5, "must_include": [common],
                                         "exclude": [common[:3]]})
    assert _fields(r) == ["exclude"] and common in r.text
    r = client.post("/v1/cohorts", json={"size": 5, "any_of": [common], "exclude": [common]})
    assert _fields(r) == ["exclude"]
    r = client.post("/v1/patients", json={"n": 2, "age": 50, "sex": "F",
                                          "must_include": [common], "exclude": [common]})
    assert _fields(r) == ["exclude"] and "both required and excluded" in r.text
    r = client.post("/v1/cohorts", json={"size": 5, "female_fraction": 0.5,
                                         "any_of": [female_only]})
    assert _fields(r) == ["any_of"]
    r = client.post("/v1/patients", json={"n": 2, "age": 30, "sex": "M", "any_of": ["999.99"]})
    assert _fields(r) == ["any_of"] and "999.99" in r.text
    absent = next(cat for cat in ("V30", "E812", "740", "014")
                  if not any(category_of(c) == cat for c in _vocab(gen).codes))
    r = client.post("/v1/cohorts", json={"size": 5, "exclude": ["401.9", absent]})
    assert _fields(r) == ["exclude.1"] and absent in r.text


def test_exclude_everything_a_patient_could_carry_is_refused():
    patients = [Patient("a", 30, "F", (("4019", "25000"), ("V220",))),
                Patient("b", 60, "M", (("4019", "185"),))]
    vocab = Vocabulary.from_patients(patients)
    targeting = Targeting(vocab, ValidityMask(vocab))
    everything = targeting.expand(["401", "250", "V22", "185"], "exclude")
    with pytest.raises(TargetError, match="remove every code") as err:
        targeting.check([60], ["M", "F"], [], [], everything, True)
    assert err.value.field == "exclude"
    # Without 401, 250 and 185 (prostate, male-only) only V22.0 (pregnancy, female-only) is
    # left: a female cohort still works, a cohort with men does not.
    no_men = targeting.expand(["401", "250", "185"], "exclude")
    targeting.check([30], ["F"], [], [], no_men, True)
    with pytest.raises(TargetError, match="remove every code"):
        targeting.check([30], ["F", "M"], [], [], no_men, True)
    targeting.check([30], ["M"], [], [], no_men, False)  # the validity mask off: V22.0 is left
    with pytest.raises(TargetError, match="any_of.0") as err:
        targeting.expand(["428"], "any_of")
    assert err.value.field == "any_of.0"


def test_possible_demographics_cover_what_the_chunk_plan_draws():
    from app.service.jobs import chunk_plan, possible_demographics
    from app.service.schemas import CohortSpec

    spec = CohortSpec.model_validate({
        "size": 2000, "female_fraction": 1.0, "seed": 3,
        "age": {"bins": [{"min": 0.04, "max": 17.96, "weight": 1},
                         {"min": 64.2, "max": 66.0, "weight": 1}]}})
    ages, sexes = possible_demographics(spec)
    assert sexes == ["F"] and ages == [*range(19), 64, 65, 66]
    drawn = chunk_plan(spec, 0, 2000)
    assert {int(a) for a, _ in drawn} <= set(ages) and {s for _, s in drawn} == {"F"}
    assert possible_demographics(CohortSpec.model_validate({"size": 1, "age": 30.0}))[1] == \
        ["F", "M"]


class _SmallBatches:
    """The real engine, reporting a small engine batch (how many patients the generator hands
    it at a time when a request can be stopped)."""

    def __init__(self, inner, batch_size: int) -> None:
        self.inner, self.batch_size, self.calls = inner, batch_size, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.inner.generate(*args, **kwargs)


def test_targeted_patients_ignore_stop_slicing_and_stop_between_engine_calls(gen):
    """A stoppable targeted request is decoded an engine batch at a time with the same
    patients; rows are keyed on their number (``first_index``); a stop request ends it."""
    from app.runtime.generators import EngineGenerator, GenerationStopped

    engine = _SmallBatches(gen.engine, 4)
    small = EngineGenerator(engine, gen.manifest, gen.bundle_version)
    vocab = _vocab(gen)
    common = vocab.codes[int(np.argmax(vocab.counts))]
    # the commonest code whose category keeps another code after small-cell suppression
    counts = dict(zip(vocab.codes, (int(n) for n in vocab.counts), strict=True))
    sibling = max((c for c in vocab.codes
                   if sum(category_of(x) == category_of(c) for x in vocab.codes) >= 2),
                  key=counts.__getitem__)
    demo = [(60.0, "F"), (35.0, "M")] * 10
    for targets in ({"any_of": [_rare_category(gen)]}, {"exclude": [common]},
                    {"any_of": [category_of(sibling)], "exclude": [sibling]}):
        whole = small.generate(demo, seed=5, **targets)
        engine.calls = 0
        sliced = small.generate(demo, seed=5, should_stop=lambda: False, **targets)
        assert engine.calls >= 5, targets  # 20 patients, 4 per engine call
        assert [p.visits for p in sliced] == [p.visits for p in whole], targets
    # exclude only: patient k of a request is patient first_index + k of the seed
    full = small.generate(demo, seed=5, exclude=[common])
    tail = small.generate(demo[8:], seed=5, exclude=[common], first_index=8)
    assert [p.visits for p in tail] == [p.visits for p in full[8:]]
    asked = []
    engine.calls = 0
    with pytest.raises(GenerationStopped):
        small.generate(demo, seed=5, any_of=[_rare_category(gen)],
                       should_stop=lambda: bool(asked.append(1)) or len(asked) > 2)
    assert engine.calls == 2


def test_job_id_covers_targeting_model_and_plan_version(monkeypatch):
    from app.service import jobs
    from app.service.schemas import CohortSpec

    base = CohortSpec.model_validate({"size": 10, "seed": 1})
    variants = [base, *(CohortSpec.model_validate({"size": 10, "seed": 1, **extra}) for extra in (
        {"any_of": ["250"]}, {"exclude": ["250"]}, {"any_of": ["250"], "exclude": ["25000"]},
        {"model": "other"}))]
    ids = {jobs.job_id_for(spec, "bundle-1") for spec in variants}
    assert len(ids) == len(variants)
    first = jobs.job_id_for(base, "bundle-1")
    monkeypatch.setattr(jobs, "PLAN_VERSION", jobs.PLAN_VERSION + 1)
    assert jobs.job_id_for(base, "bundle-1") != first
