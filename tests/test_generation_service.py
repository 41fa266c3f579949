"""The generation service used directly (app.runtime.generation): one check per request, the
documented refusal, and the same patients whichever caller asks - the API's route, the cohort
worker, the evaluator (real engine, tiny bundle)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from test_service_support import session_generator, wait_for

from app.decoding.errors import GenerationError, InvalidParametersError
from app.decoding.params import PlainParams
from app.runtime.generation import (
    Batching,
    GenerationService,
    InvalidRequestError,
    Limits,
    patient_id,
    patient_rows,
)
from app.runtime.requests import CohortSpec, GenerationRequest, PatientsRequest
from app.service import jobs
from app.service.api import create_app
from app.service.store import EmbeddedStore
from app.settings import Settings
from training.evaluate import service_generate_fn


@pytest.fixture(scope="module")
def gen():
    return session_generator()


def unseen_code(gen) -> str:
    return next(c for c in ("0010", "V9109", "E0000", "0020") if not gen.has_code(c))


def visits(patients) -> list:
    return [[list(v) for v in p.visits] for p in patients]


# -- one check, the documented refusal ----------------------------------------------------------

@pytest.mark.parametrize("body, field, also", [
    ({"n": 101, "age": 50, "sex": "F"}, "n", ()),
    ({"patients": [{"age": 50, "sex": "F"}] * 101}, "patients", ()),
    ({"n": 100, "age": 50, "sex": "F", "strategy": "rerank", "params": {"candidates": 64}},
     "n", ("params.candidates",)),
    ({"n": 1, "age": 50, "sex": "F", "params": {"max_visits": 999}}, "params.max_visits", ()),
    ({"n": 1, "age": 50, "sex": "F", "model": "nope"}, "model", ()),
])
def test_a_refused_request_raises_invalid_request_error_naming_the_field(gen, body, field,
                                                                          also):
    service = GenerationService(gen)
    request = PatientsRequest.model_validate(body)
    with pytest.raises(InvalidRequestError) as err:
        service.prepare(request, n=len(request.demographics()), n_field=request.count_field,
                        limits=Limits.for_patients(Settings(redis_url=None)))
    assert (err.value.field, err.value.also) == (field, also)
    # a GenerationError like the engine's own refusals, so every caller handles them alike
    assert isinstance(err.value, InvalidParametersError) and isinstance(err.value, GenerationError)


def test_codes_are_checked_against_the_bundle_and_fields_when_the_request_is_built(gen):
    service = GenerationService(gen)
    code = unseen_code(gen)
    with pytest.raises(InvalidRequestError, match=f"code {code} is not in the model's"
                       ) as err:
        service.prepare(PatientsRequest.model_validate(
            {"n": 1, "age": 50, "sex": "F", "must_include": ["4019", code]}))
    assert err.value.field == "must_include.1"
    # Field-level problems never reach the service: building the typed request refuses them.
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate({"must_include": ["ABC"]})
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate({"strategy": "rerank", "params": {"candidates": 0}})


def test_an_unavailable_strategy_and_an_infeasible_cohort_are_refused(gen):
    class Limited:  # a bundle that cannot serve retrieve_edit (as a DP bundle)
        def __init__(self) -> None:
            self.unavailable = {"retrieve_edit": "no retrieval index"}

        def __getattr__(self, name):
            return getattr(gen, name)

    with pytest.raises(InvalidRequestError, match="no retrieval index") as err:
        GenerationService(Limited()).prepare(GenerationRequest(strategy="retrieve_edit"))
    assert err.value.field == "strategy"
    # Targeting that some age or sex of the cohort could not meet: refused before decoding.
    vocab = gen.engine.vocab
    spec = CohortSpec.model_validate({"size": 10, "exclude": list(vocab.codes)})
    with pytest.raises(GenerationError) as err:
        GenerationService(gen).prepare(spec, n=spec.size, n_field="size",
                                       domain=jobs.possible_demographics(spec))
    assert getattr(err.value, "field", "").startswith("exclude")


def test_parameters_are_validated_once_when_the_request_is_built(gen, monkeypatch):
    request = PatientsRequest.model_validate({"n": 3, "age": 60, "sex": "F", "seed": 4,
                                              "strategy": "rerank",
                                              "params": {"candidates": 2}})
    service = GenerationService(gen)
    expected = visits(service.generate(service.prepare(request), request.demographics()))

    def again(*args, **kwargs):
        raise AssertionError("the parameters were validated a second time")

    # Every later step (the work budget, the engine) takes the parsed parameters as they are.
    monkeypatch.setattr(PlainParams, "model_validate", classmethod(again))
    prepared = service.prepare(request, n=3, limits=Limits.for_patients(Settings()))
    assert isinstance(prepared.params, PlainParams) and prepared.params.candidates == 2
    assert visits(service.generate(prepared, request.demographics())) == expected


def test_a_random_seed_is_drawn_once_per_request(gen):
    service = GenerationService(gen)
    request = PatientsRequest.model_validate({"n": 1, "age": 40, "sex": "M"})
    a, b = service.prepare(request), service.prepare(request)
    assert 0 <= a.seed < 2**63 and a.seed != b.seed


# -- the same patients from every caller ----------------------------------------------------------

SPEC = {"size": 30, "seed": 11, "age": {"min": 20, "max": 85}, "female_fraction": 0.4}


def sync_patients(service: GenerationService, demographics, **extra) -> list:
    request = PatientsRequest.model_validate(
        {"patients": [{"age": a, "sex": s} for a, s in demographics], **extra})

    async def run():
        prepared = service.prepare(request, n=len(demographics), n_field="patients")
        return await service.generate_async(prepared, request.demographics())

    return asyncio.run(run())


# Not cooccurrence: the engine applies its bias in place of the stop calibration for a whole
# engine batch once any row is inside a visit, so its patients depend on the batch's other rows
# (a chunk's engine calls are smaller than one request's).
@pytest.mark.parametrize("strategy, params", [("plain", {"temperature": 0.9}),
                                              ("rerank", {"candidates": 2})])
@pytest.mark.parametrize("window_s", [0.0, 0.05])  # alone, and through the batching queue
def test_worker_sync_and_evaluator_paths_give_identical_patients(gen, window_s, strategy,
                                                                 params):
    service = GenerationService(gen, Batching(window_s=window_s))
    spec = CohortSpec.model_validate({**SPEC, "strategy": strategy, "params": params})
    job_id = jobs.job_id_for(spec, gen.bundle_version)
    demographics = jobs.chunk_plan(spec, 0, spec.size)
    # The worker: chunk 1 of 10 patients, 4 per engine call (patients 11-20 of the cohort).
    chunk = jobs.generate_chunk(service, spec, job_id, 1, 10, 4)
    assert [(r["id"], r["n"]) for r in chunk] == [(patient_id(job_id[:8], n, 6), n)
                                                  for n in range(11, 21)]
    assert [(r["age"], r["sex"]) for r in chunk] == demographics[10:20]
    # The API's path: the cohort's demographics and seed as one synchronous request.
    alone = sync_patients(service, demographics, seed=spec.seed, strategy=spec.strategy,
                          params=spec.params)
    assert [r["visits"] for r in chunk] == visits(alone)[10:20]
    # The evaluator's path: the same request as a protocol chunk.
    evaluate = service_generate_fn(service, {spec.strategy: spec.params})
    assert visits(evaluate(spec.strategy, demographics, spec.seed)) == visits(alone)


def test_targeted_requests_agree_across_paths(gen):
    vocab = gen.engine.vocab
    common = vocab.codes[max(range(len(vocab.codes)), key=lambda i: vocab.counts[i])]
    spec = CohortSpec.model_validate({"size": 12, "seed": 3, "age": {"min": 30, "max": 70},
                                      "exclude": [common]})
    service = GenerationService(gen)
    job_id = jobs.job_id_for(spec, gen.bundle_version)
    rows = jobs.generate_chunk(service, spec, job_id, 1, 6, 6)
    alone = sync_patients(service, jobs.chunk_plan(spec, 0, 12), seed=3, exclude=[common])
    assert [r["visits"] for r in rows] == visits(alone)[6:]
    assert all(common not in v for r in rows for v in r["visits"])


def test_patient_ids_are_made_in_one_place():
    class P:
        visits = (("4019",),)

    rows = patient_rows([P(), P()], [(50.0, "F"), (3.5, "M")], scope="abcd1234", width=6,
                        first=11)
    assert rows == [{"id": "syn-abcd1234-000011", "n": 11, "age": 50.0, "sex": "F",
                     "visits": [["4019"]]},
                    {"id": "syn-abcd1234-000012", "n": 12, "age": 3.5, "sex": "M",
                     "visits": [["4019"]]}]
    assert patient_id("0f3c2a9b", 7, 3) == "syn-0f3c2a9b-007"


def test_over_http_a_cohort_and_a_synchronous_request_give_the_same_patients(gen):
    settings = Settings(redis_url=None, chunk_size=7, lease_s=5.0, rate_limit_per_minute=0)
    spec = {"size": 20, "seed": 21, "age": {"min": 30, "max": 80}}
    with TestClient(create_app(settings, generator=gen, store=EmbeddedStore())) as c:
        job = c.post("/v1/cohorts", json=spec).json()["id"]
        wait_for(lambda: c.get(f"/v1/cohorts/{job}").json()["status"] == "done", 60, 0.05,
                 "cohort")
        cohort = c.get(f"/v1/cohorts/{job}/result").json()["patients"]
        body = {"patients": [{"age": p["age"], "sex": p["sex"]} for p in cohort], "seed": 21}
        r = c.post("/v1/patients", json=body)
        assert r.status_code == 200, r.text

    def codes(patients):
        return [[[x["code"] for x in v["codes"]] for v in p["visits"]] for p in patients]

    assert codes(r.json()["patients"]) == codes(cohort)
