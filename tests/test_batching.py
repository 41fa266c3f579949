"""Micro-batching of POST /v1/patients: rows of several requests in one engine call, with every
request's response byte-identical to the one it gets alone (real engine, tiny bundle)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fastapi.testclient import TestClient
from test_service_support import session_generator

from app.runtime.batcher import MicroBatcher
from app.service.api import create_app
from app.service.store import EmbeddedStore
from app.settings import Settings


@pytest.fixture(scope="module")
def gen():
    return session_generator()


def female_only_code(gen) -> str | None:
    """A vocabulary code the MCE sex edit forbids for men (None if the vocabulary has none)."""
    engine = gen.engine
    for code in sorted(engine.vocab.codes):
        reason = engine.validity.violation(code, 50.0, "M")
        if reason and "sex" in reason and engine.validity.violation(code, 50.0, "F") is None:
            return code
    return None


def some_code(gen) -> str:
    for code in ("4019", "25000", "4280", "2724", "42731"):
        if gen.has_code(code):
            return code
    return next(c for c in sorted(gen._codes) if c[0].isdigit() and "401" <= c[:3] <= "459")


# -- the engine's per-row keys --------------------------------------------------------------------

@pytest.mark.parametrize("strategy, params", [
    ("plain", {}), ("plain", {"top_p": 0.9, "top_k": 40}), ("cooccurrence", {"alpha": 1.0}),
    ("rerank", {"candidates": 2}), ("retrieve_edit", {})])
def test_rows_of_several_requests_match_each_request_alone(gen, strategy, params):
    if strategy not in gen.strategies:
        pytest.skip(f"{strategy} not offered by this bundle")
    engine = gen.engine
    code = some_code(gen)
    requests = [([(67.0, "F")], 7, None), ([(3.0, "M"), (45.5, "F"), (80.0, "M")], 2**62 + 5,
                                           [code]),
                ([(30.0, "F")], 0, None), ([(50.0, "M"), (50.0, "M")], 7, None)]
    alone = [engine.generate(d, strategy, params, seed=s, must_include=m)
             for d, s, m in requests]
    merged = engine.generate(
        [x for d, _, _ in requests for x in d], strategy, params, seed=123,
        must_include=[list(m or []) for d, _, m in requests for _ in d],
        row_seeds=[s for d, s, _ in requests for _ in d],
        row_indices=[i for d, _, _ in requests for i in range(len(d))])
    assert merged.token_ids == [t for r in alone for t in r.token_ids]
    assert [p.patient_id for p in merged.patients] == [p.patient_id for r in alone
                                                       for p in r.patients]
    # The per-row call with the request's own seed and indices is the plain call, byte for byte.
    demo = requests[1][0]
    plain = engine.generate(demo, strategy, params, seed=9, must_include=[code])
    rows = engine.generate(demo, strategy, params, seed=9, must_include=[code],
                           row_seeds=[9] * len(demo), row_indices=range(len(demo)))
    assert rows.to_json() == plain.to_json()


def test_generate_batch_splits_back_per_request(gen):
    requests = [([(60.0, "F")], 11, None), ([(40.0, "M"), (8.0, "F")], 12, [some_code(gen)])]
    out = gen.generate_batch(requests, strategy="plain", params={}, validity_mask=True)
    assert [len(p) for p in out] == [1, 2]
    for (demo, seed, must), patients in zip(requests, out, strict=True):
        assert patients == gen.generate(demo, strategy="plain", params={}, seed=seed,
                                        must_include=must)


def test_bad_row_keys_are_refused(gen):
    from app.decoding.errors import InvalidParametersError

    with pytest.raises(InvalidParametersError):
        gen.engine.generate([(50, "F")], row_seeds=[1, 2])
    with pytest.raises(InvalidParametersError):
        gen.engine.generate([(50, "F")], row_seeds=[-1])
    with pytest.raises(InvalidParametersError):
        gen.engine.generate([(50, "F")], row_indices=[0, 1])


# -- the service ------------------------------------------------------------------------------------

def make_client(gen, **overrides) -> TestClient:
    settings = Settings(redis_url=None, embedded_workers=0, rate_limit_per_minute=0,
                        **overrides)
    return TestClient(create_app(settings, generator=gen, store=EmbeddedStore()))


def burst(client: TestClient, bodies: list[dict]) -> list:
    """All ``bodies`` posted at once from threads; the responses in order."""
    out: list = [None] * len(bodies)
    gate = threading.Barrier(len(bodies))

    def post(i: int) -> None:
        gate.wait()
        out[i] = client.post("/v1/patients", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def batch_sizes(client: TestClient) -> tuple[float, float]:
    """(engine calls, patients) of POST /v1/patients so far, from /metrics."""
    calls = patients = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("synthehr_patients_batch_size_count"):
            calls = float(line.split()[-1])
        elif line.startswith("synthehr_patients_batch_size_sum"):
            patients = float(line.split()[-1])
    return calls, patients


def test_responses_identical_alone_and_in_a_concurrent_burst(gen):
    code = some_code(gen)
    bodies = [{"n": 1, "age": 60, "sex": "F", "seed": k} for k in range(6)]
    bodies += [{"patients": [{"age": 45, "sex": "M"}, {"age": 3, "sex": "F"}], "seed": 77},
               {"n": 3, "age": 50, "sex": "M", "seed": 5, "must_include": [code]},
               {"n": 1, "age": 60, "sex": "F", "seed": 3},  # a duplicate of an earlier body
               {"n": 2, "age": 70, "sex": "F", "seed": 8, "strategy": "cooccurrence",
                "params": {"alpha": 0.5}},
               {"n": 1, "age": 70, "sex": "F", "seed": 9, "strategy": "cooccurrence",
                "params": {"alpha": 0.5}},
               {"n": 1, "age": 20, "sex": "M", "seed": 4, "validity_mask": False}]
    with make_client(gen, batch_window_ms=0) as c:
        alone = [c.post("/v1/patients", json=b) for b in bodies]
        assert batch_sizes(c)[0] == len(bodies)
    assert all(r.status_code == 200 for r in alone), [r.text for r in alone]
    with make_client(gen, batch_window_ms=400, max_batch_patients=1000,
                     inference_threads=1) as c:
        together = burst(c, bodies)
        calls, patients = batch_sizes(c)
    assert [r.status_code for r in together] == [200] * len(bodies)
    for a, b in zip(alone, together, strict=True):
        assert a.content == b.content
    # Three keys (plain, cooccurrence/0.5, plain without the mask): far fewer engine calls.
    assert patients == sum(len(b.get("patients") or [0] * b["n"]) for b in bodies)
    assert calls < len(bodies) - 4, calls


def test_a_failing_request_does_not_fail_its_batch(gen):
    code = female_only_code(gen)
    if code is None:
        pytest.skip("no female-only code in this vocabulary")
    good = [{"n": 1, "age": 50, "sex": "F", "seed": k, "must_include": [code]} for k in range(3)]
    bad = {"n": 2, "age": 50, "sex": "M", "seed": 1, "must_include": [code]}
    bodies = [*good[:2], bad, good[2]]
    with make_client(gen, batch_window_ms=0) as c:
        alone = [c.post("/v1/patients", json=b) for b in bodies]
    with make_client(gen, batch_window_ms=400, inference_threads=1) as c:
        together = burst(c, bodies)
    assert [r.status_code for r in alone] == [200, 200, 422, 200]
    assert [(r.status_code, r.content) for r in together] == [(r.status_code, r.content)
                                                            for r in alone]
    assert together[2].json()["detail"][0]["field"] == "must_include"


# -- the scheduler alone (a fake generator) -------------------------------------------------------

class Recorder:
    """generate/generate_batch that record their calls; patient = (seed, index, age)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()

    def generate(self, demographics, strategy="plain", params=None, seed=0, must_include=None,
                 validity_mask=True, should_stop=None):
        if any(a < 0 for a, _ in demographics):
            raise ValueError(f"bad age in request {seed}")
        return [(seed, i, a) for i, (a, _) in enumerate(demographics)]

    def generate_batch(self, requests, strategy="plain", params=None, validity_mask=True,
                       should_stop=None):
        with self.lock:
            self.calls.append([seed for _, seed, _ in requests])
        out = [self.generate(d, seed=s) for d, s, _ in requests]
        return out


def run_batcher(batcher: MicroBatcher, items: list[tuple]) -> list:
    async def main():
        async def one(demo, seed, params):
            try:
                return await batcher.generate(demo, "plain", params, seed, None, True)
            except ValueError as err:
                return str(err)

        return await asyncio.gather(*(one(*item) for item in items))

    return asyncio.run(main())


def test_scheduler_groups_by_params_caps_patients_and_isolates_errors():
    rec = Recorder()
    batcher = MicroBatcher(rec, None, window_s=0.05, max_patients=4, slots=1)
    items = [([(10.0, "F")], k, {}) for k in range(6)]
    items += [([(20.0, "M")] * 2, 100, {"top_p": 0.5}), ([(-1.0, "M")], 101, {"top_p": 0.5}),
              ([(30.0, "F")], 102, {"top_p": 0.5})]
    out = run_batcher(batcher, items)
    assert out[:6] == [[(k, 0, 10.0)] for k in range(6)]
    assert out[6] == [(100, 0, 20.0), (100, 1, 20.0)]
    assert out[7] == "bad age in request 101" and out[8] == [(102, 0, 30.0)]
    groups = sorted(rec.calls)
    assert sorted(s for g in groups for s in g) == [0, 1, 2, 3, 4, 5, 100, 101, 102]
    assert [0] in groups  # the first request found the engine idle: it ran at once
    assert all(len(g) <= 4 for g in groups) and [1, 2, 3, 4] in groups  # capped at 4 patients
    assert not any({0, 100} <= set(g) for g in groups)  # different params never share a call
    # Off: every request is its own generate call.
    rec2 = Recorder()
    off = MicroBatcher(rec2, None, window_s=0, max_patients=4, slots=1)
    assert run_batcher(off, items[:3]) == out[:3] and rec2.calls == []
