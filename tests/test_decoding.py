"""Decoding engine: grammar, validity mask, strategies, must_include, determinism, errors.

Structure must not depend on training, so these run a deliberately untrained
:class:`RandomStepModel` over a small vocabulary of real codes, including codes under MCE age
and sex edits (pregnancy, prostate, newborn).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.cooccurrence import build_cooccurrence
from app.corpus import Patient
from app.decoding import (
    CooccurrenceStats,
    Engine,
    ImpossibleConstraintError,
    InvalidParametersError,
    RandomStepModel,
    RetrievalIndex,
    UnknownCodeError,
)
from app.decoding.grammar import Grammar
from app.decoding.sampling import row_keys, sample_tokens, uniforms
from app.icd9.edits import load_edits
from app.vocab import BOS, END_VISIT, EOS, VISIT, Vocabulary

# Unrestricted codes, and codes under MCE edits: V220/6260 female, 185/60000 male (60000 adult),
# 64891 maternity 12-55 female, 7620/V3000 newborn, V200 paediatric.
COMMON = ["4019", "25000", "4280", "42731", "5849", "2724", "41401", "2859", "486", "5990",
          "311", "49390", "E8497", "53081", "2449"]
RESTRICTED = ["V220", "6260", "185", "60000", "64891", "7620", "V3000", "V200"]


def _train_patients(n: int = 400, seed: int = 0) -> list[Patient]:
    rng = np.random.default_rng(seed)
    clusters = [COMMON[:5], COMMON[5:10], COMMON[10:]]
    patients = []
    for i in range(n):
        cluster = clusters[i % 3]
        visits = []
        for _ in range(int(rng.integers(1, 4))):
            size = int(rng.integers(1, 4))
            visits.append(tuple(sorted(set(rng.choice(cluster, size=size).tolist()))))
        patients.append(Patient(f"t{i}", float(rng.integers(20, 85)), "FM"[i % 2],
                                tuple(visits)))
    # Every restricted code once, on a patient it suits.
    patients.append(Patient("f1", 30.0, "F", (("V220", "64891", "6260"),)))
    patients.append(Patient("m1", 60.0, "M", (("185", "60000"),)))
    patients.append(Patient("n1", 0.0, "F", (("7620", "V3000", "V200"),)))
    return patients


@pytest.fixture(scope="module")
def world():
    patients = _train_patients()
    vocab = Vocabulary.from_patients(patients)
    matrix = build_cooccurrence(patients, vocab)
    stats = CooccurrenceStats.from_vocab(matrix, vocab, sum(len(p.visits) for p in patients))
    index = RetrievalIndex.from_patients(patients, vocab)
    return patients, vocab, stats, index


def _engine(world, **kwargs) -> Engine:
    _, vocab, stats, index = world
    options = {"max_visits": 4, "max_codes_per_visit": 5, "max_length": 64, "batch_size": 64}
    options.update(kwargs)
    model = RandomStepModel(len(vocab), seed=options.pop("model_seed", 7))
    return Engine(model, vocab, cooccurrence=stats, retrieval=index, **options)


def _demographics(n: int, seed: int = 1) -> list[tuple[float, str]]:
    rng = np.random.default_rng(seed)
    ages = rng.choice([0.0, 3.0, 14.0, 30.0, 50.0, 70.0, 95.0], size=n)
    return [(float(a), str(s)) for a, s in zip(ages, rng.choice(["F", "M"], size=n))]


def _check_structure(vocab: Vocabulary, tokens: list[int], max_visits: int, max_codes: int,
                     max_length: int) -> None:
    ids = vocab.index
    assert tokens[0] == ids[BOS] and tokens[-1] == ids[EOS], tokens
    assert len(tokens) <= max_length
    body = tokens[1:-1]
    assert body, "no visit"
    visits, current = 0, None
    for t in body:
        if t == ids[VISIT]:
            assert current is None
            current = []
            visits += 1
        elif t == ids[END_VISIT]:
            assert current, "empty visit"
            current = None
        else:
            assert t >= vocab.n_special and current is not None, tokens
            assert t not in current, "repeated code in a visit"
            current.append(t)
            assert len(current) <= max_codes
    assert current is None and 1 <= visits <= max_visits


def _violations(patients) -> int:
    edits = load_edits()
    return sum(not edits.is_valid(c, p.age, p.sex) for p in patients for v in p.visits for c in v)


@pytest.mark.parametrize("limits", [(4, 5, 64), (1, 1, 5), (3, 8, 12), (6, 3, 200)])
def test_grammar_and_mask_hold_over_thousands_of_untrained_samples(world, limits) -> None:
    max_visits, max_codes, max_length = limits
    engine = _engine(world, max_visits=max_visits, max_codes_per_visit=max_codes,
                     max_length=max_length)
    demo = _demographics(1500, seed=max_length)
    result = engine.generate(demo, "plain", seed=5)
    vocab = world[1]
    grammar = Grammar(len(vocab), max_visits, max_codes, max_length)
    for tokens in result.token_ids:
        _check_structure(vocab, tokens, max_visits, max_codes, grammar.max_length)
    assert _violations(result.patients) == 0
    assert [(p.age, p.sex) for p in result.patients] == demo
    # The same model without the mask does break the edits: the mask, not luck, kept them.
    unmasked = engine.generate(demo, "plain", seed=5, validity_mask=False)
    for tokens in unmasked.token_ids:
        _check_structure(vocab, tokens, max_visits, max_codes, grammar.max_length)
    if max_length > 5:
        assert _violations(unmasked.patients) > 0


@pytest.mark.parametrize("strategy,params", [
    ("plain", {"temperature": 0.5, "top_k": 3}),
    ("plain", {"temperature": 2.0, "top_p": 0.7}),
    ("cooccurrence", {"alpha": 3.0}),
    ("cooccurrence", {"alpha": 1.0, "keep_visit_length": False, "top_p": 0.9}),
    ("cooccurrence", {"alpha": 3.0, "normalize": True}),
    ("rerank", {"candidates": 4}),
    ("rerank", {"candidates": 4, "selection": "argmax"}),
    ("retrieve_edit", {"keep_fraction": 0.7, "min_distance": 0.0}),
])
def test_every_strategy_keeps_structure_and_validity(world, strategy, params) -> None:
    engine = _engine(world)
    result = engine.generate(_demographics(400), strategy, params, seed=11)
    for tokens in result.token_ids:
        _check_structure(world[1], tokens, 4, 5, 64)
    assert _violations(result.patients) == 0
    assert len(result.patients) == 400


def test_per_request_limits_override_engine_defaults(world) -> None:
    engine = _engine(world)
    result = engine.generate(_demographics(300), "plain",
                             {"max_visits": 2, "max_codes_per_visit": 2}, seed=3)
    for tokens in result.token_ids:
        _check_structure(world[1], tokens, 2, 2, 64)


@pytest.mark.parametrize("strategy", ["plain", "cooccurrence", "rerank", "retrieve_edit"])
def test_must_include_is_honoured(world, strategy) -> None:
    engine = _engine(world, max_visits=2, max_codes_per_visit=3, max_length=14)
    demo = [(a, s) for a, s in _demographics(300) if a >= 18]
    params = {"min_distance": 0.0} if strategy == "retrieve_edit" else None
    result = engine.generate(demo, strategy, params, seed=2, must_include=["250.00", "4280"])
    for p, tokens in zip(result.patients, result.token_ids, strict=True):
        codes = {c for v in p.visits for c in v}
        assert {"25000", "4280"} <= codes
        _check_structure(world[1], tokens, 2, 3, 14)
    # Per-patient lists, including a code the mask allows only for women.
    wanted = [["V220"] if s == "F" and 12 <= a <= 55 else ["185"] if s == "M" else []
              for a, s in demo]
    result = engine.generate(demo, strategy, params, seed=2, must_include=wanted)
    for p, want in zip(result.patients, wanted, strict=True):
        assert set(want) <= {c for v in p.visits for c in v}
    assert _violations(result.patients) == 0


def test_must_include_fills_exactly_the_available_slots(world) -> None:
    engine = _engine(world, max_visits=1, max_codes_per_visit=3, max_length=64)
    result = engine.generate(_demographics(200), seed=4, must_include=["4019", "25000", "4280"],
                             validity_mask=False)
    for p in result.patients:
        assert len(p.visits) == 1 and set(p.visits[0]) == {"4019", "25000", "4280"}


def test_determinism_byte_identical_and_independent_of_batch_size(world) -> None:
    engine = _engine(world)
    demo = _demographics(150)
    for strategy, params in [("plain", {"top_p": 0.9}), ("cooccurrence", {"alpha": 2.0}),
                             ("rerank", {"candidates": 3}),
                             ("retrieve_edit", {"min_distance": 0.3})]:
        first = engine.generate(demo, strategy, params, seed=42, must_include=["4019"]).to_json()
        again = engine.generate(demo, strategy, params, seed=42, must_include=["4019"]).to_json()
        assert first == again
        for batch in (1, 7, 256):
            other = engine.generate(demo, strategy, params, seed=42, must_include=["4019"],
                                    batch_size=batch).to_json()
            assert other == first, (strategy, batch)
        # A patient's output does not depend on the other patients in the request.
        head = engine.generate(demo[:10], strategy, params, seed=42, must_include=["4019"])
        full = engine.generate(demo, strategy, params, seed=42, must_include=["4019"])
        assert head.token_ids == full.token_ids[:10]
        different = engine.generate(demo, strategy, params, seed=43,
                                    must_include=["4019"]).to_json()
        assert different != first


def _mean_visit_score(engine: Engine, stats: CooccurrenceStats, token_ids) -> float:
    return float(np.mean([stats.visit_score(engine._code_ids(t)) for t in token_ids]))


def test_cooccurrence_raises_the_cooccurrence_score(world) -> None:
    stats = world[2]
    engine = _engine(world)
    demo = _demographics(600)
    plain = engine.generate(demo, "plain", seed=8)
    biased = engine.generate(demo, "cooccurrence", {"alpha": 3.0}, seed=8)
    zero = engine.generate(demo, "cooccurrence", {"alpha": 0.0}, seed=8)
    assert zero.token_ids == plain.token_ids
    score_plain = _mean_visit_score(engine, stats, plain.token_ids)
    score_biased = _mean_visit_score(engine, stats, biased.token_ids)
    assert score_biased > 1.3 * score_plain, (score_plain, score_biased)
    # keep_visit_length: the bias moves mass among codes, not towards longer visits.
    lengths = [np.mean([len(v) for v in p.visits]) for p in plain.patients]
    lengths_biased = [np.mean([len(v) for v in p.visits]) for p in biased.patients]
    assert abs(np.mean(lengths_biased) - np.mean(lengths)) < 0.5


def test_cooccurrence_normalize_sums_conditional_frequencies(world) -> None:
    from app.decoding.strategies import CooccurrenceBias

    stats = world[2]
    width = stats.code_counts.size + stats.n_special
    codes = np.flatnonzero(np.diff(stats.indptr) > 0)[:2]
    bias = CooccurrenceBias(stats, 1, width, 0.5, normalize=True)
    for c in codes:
        bias.add(np.array([0]), np.array([c + stats.n_special]))
    dense = stats.matrix.toarray()
    expected = sum(dense[c] / max(stats.code_counts[c], 1.0) for c in codes)
    np.testing.assert_allclose(bias.bias[0, stats.n_special:], 0.5 * np.log1p(expected),
                               rtol=1e-5, atol=1e-7)


def test_cooccurrence_npmi_bias_is_the_mean_positive_npmi(world) -> None:
    from app.decoding.strategies import CooccurrenceBias

    stats = world[2]
    n_codes = stats.code_counts.size
    width = n_codes + stats.n_special
    codes = np.flatnonzero(np.diff(stats.indptr) > 0)[:3]
    bias = CooccurrenceBias(stats, 2, width, 2.0, kind="npmi")
    for c in codes:
        bias.add(np.array([0]), np.array([c + stats.n_special]))
    # by hand: NPMI of each pair from the dense counts, its positive part, mean over the codes
    dense = stats.matrix.toarray().astype(float)
    n = stats.n_visits
    expected = np.zeros(n_codes)
    for c in codes:
        for j in range(n_codes):
            if dense[c, j] > 0:
                p_ab = dense[c, j] / n
                pmi = math.log(p_ab / ((stats.code_counts[c] / n) * (stats.code_counts[j] / n)))
                value = 1.0 if p_ab >= 1.0 else pmi / -math.log(p_ab)
                expected[j] += max(min(value, 1.0), 0.0)
    np.testing.assert_allclose(bias.bias[0, stats.n_special:], 2.0 * expected / len(codes),
                               rtol=1e-4, atol=1e-6)
    assert not bias.bias[1].any()  # the other row is untouched
    assert bias.bias[0, stats.n_special:].max() <= 2.0 + 1e-6
    bias.reset(np.array([0]))
    assert not bias.bias.any() and not bias.in_visit.any()


def test_cooccurrence_npmi_raises_the_coherence(world) -> None:
    stats = world[2]
    engine = _engine(world)
    demo = _demographics(600)
    plain = engine.generate(demo, "plain", seed=8)
    biased = engine.generate(demo, "cooccurrence", {"alpha": 4.0, "bias": "npmi"}, seed=8)
    coherence = lambda r: np.mean(
        stats.coherence_many([engine._code_ids(t) for t in r.token_ids]))
    assert coherence(biased) > coherence(plain) + 0.05


def test_rerank_tilts_toward_coherence_and_argmax_seeks_the_mode(world) -> None:
    stats = world[2]
    engine = _engine(world)
    demo = _demographics(300)
    plain = engine.generate(demo, "plain", seed=9)
    ranked = engine.generate(demo, "rerank", {"candidates": 6, "coherence_weight": 5.0}, seed=9)
    coherence = lambda r: np.mean(
        stats.coherence_many([engine._code_ids(t) for t in r.token_ids]))
    assert coherence(ranked) > coherence(plain) + 0.05
    # One candidate is plain sampling (candidate 0 shares plain's random stream).
    single = engine.generate(demo, "rerank", {"candidates": 1}, seed=9)
    assert single.token_ids == plain.token_ids
    # With selection "argmax" and no coherence, rerank maximises the per-token log-likelihood
    # among candidates (mode seeking); the default "sample" with weight 0 draws a candidate
    # uniformly, so it keeps the model's distribution and does not climb toward the mode.
    by_ll = engine.generate(demo, "rerank", {"candidates": 6, "coherence_weight": 0.0,
                                             "selection": "argmax"}, seed=9)
    uniform = engine.generate(demo, "rerank", {"candidates": 6, "coherence_weight": 0.0}, seed=9)
    per_token = lambda r: np.mean(
        [ll / (len(t) - 1) for ll, t in zip(r.log_likelihood, r.token_ids, strict=True)])
    assert per_token(by_ll) > per_token(plain)
    assert per_token(by_ll) > per_token(uniform)
    assert uniform.token_ids != plain.token_ids  # not always candidate 0
    assert engine.generate(demo, "rerank", {"candidates": 6, "coherence_weight": 0.0},
                           seed=9).token_ids == uniform.token_ids


def test_retrieve_edit_never_returns_a_training_patient(world) -> None:
    patients = world[0]
    engine = _engine(world)
    demo = [(p.age, p.sex) for p in patients[:300]]
    train_sets = [frozenset(c for v in p.visits for c in v) for p in patients]
    train_exact = {tuple(tuple(sorted(v)) for v in p.visits) for p in patients}
    for min_distance in (0.0, 0.4):
        result = engine.generate(demo, "retrieve_edit",
                                 {"keep_fraction": 1.0, "min_distance": min_distance}, seed=1)
        for p in result.patients:
            assert tuple(tuple(sorted(v)) for v in p.visits) not in train_exact
            if min_distance:
                codes = frozenset(c for v in p.visits for c in v)
                nearest = min(1 - len(codes & s) / len(codes | s) for s in train_sets)
                assert nearest > min_distance
        assert max(result.attempts) >= 2  # the guard did reject and retry
    # The retrieved prompt shapes the output: its kept codes come from one comorbidity cluster,
    # so showing all of them raises the co-occurrence score over showing none.
    shown = {f: engine.generate(demo, "retrieve_edit",
                                {"keep_fraction": f, "min_distance": 0.0}, seed=1)
             for f in (0.0, 1.0)}
    assert shown[0.0].token_ids != shown[1.0].token_ids
    stats = world[2]
    assert (_mean_visit_score(engine, stats, shown[1.0].token_ids)
            > _mean_visit_score(engine, stats, shown[0.0].token_ids))


def test_retrieval_index_round_trip(world, tmp_path: Path) -> None:
    _, vocab, _, index = world
    index.save(tmp_path / "retrieval.npz")
    loaded = RetrievalIndex.load(tmp_path / "retrieval.npz", vocab)
    assert len(loaded) == len(index)
    assert loaded.visits(3) == index.visits(3)
    assert loaded.nearest(40.0, 1, 5).tolist() == index.nearest(40.0, 1, 5).tolist()
    assert all(index.sex[i] == 1 for i in index.nearest(40.0, 1, 5))


def test_clear_errors(world) -> None:
    engine = _engine(world)
    man = [(40.0, "M")]
    with pytest.raises(UnknownCodeError, match="99999"):
        engine.generate(man, must_include=["99999"])
    with pytest.raises(UnknownCodeError, match="ICD-9"):
        engine.generate(man, must_include=["ABC"])
    with pytest.raises(ImpossibleConstraintError, match=r"V220.*sex F"):
        engine.generate(man, must_include=["V220"])
    with pytest.raises(ImpossibleConstraintError, match="64891"):
        engine.generate([(70.0, "F")], must_include=["64891"])
    # With the mask off the model alone is measured, and the constraint is honoured.
    out = engine.generate(man, must_include=["V220"], validity_mask=False)
    assert "V220" in out.patients[0].visits[-1] or any("V220" in v for v in out.patients[0].visits)
    with pytest.raises(ImpossibleConstraintError, match="do not fit"):
        engine.generate(man, "plain", {"max_visits": 1, "max_codes_per_visit": 1},
                        must_include=["4019", "25000"])
    for params, field in [({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                          ({"top_k": -1}, "top_k"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(InvalidParametersError, match=field):
            engine.generate(man, "plain", params)
    with pytest.raises(InvalidParametersError, match="alpha"):
        engine.generate(man, "cooccurrence", {"alpha": -1})
    with pytest.raises(InvalidParametersError, match="candidates"):
        engine.generate(man, "rerank", {"candidates": 0})
    with pytest.raises(InvalidParametersError, match="keep_fraction"):
        engine.generate(man, "retrieve_edit", {"keep_fraction": 2})
    with pytest.raises(InvalidParametersError, match="unknown strategy"):
        engine.generate(man, "beam")
    with pytest.raises(InvalidParametersError, match=r"demographics\[0\]\.sex"):
        engine.generate([(40.0, "X")])
    with pytest.raises(InvalidParametersError, match=r"demographics\[1\]\.age"):
        engine.generate([(40.0, "F"), (-3, "F")])
    with pytest.raises(InvalidParametersError, match="seed"):
        engine.generate(man, seed=-1)
    bare = Engine(RandomStepModel(len(world[1])), world[1])
    with pytest.raises(InvalidParametersError, match="retrieval index"):
        bare.generate(man, "retrieve_edit")
    with pytest.raises(InvalidParametersError, match="co-occurrence"):
        bare.generate(man, "cooccurrence")


def test_sampling_respects_mask_top_k_and_top_p() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((500, 50)).astype(np.float32)
    allowed = rng.random((500, 50)) < 0.3
    allowed[:, 0] = True
    u = uniforms(row_keys(1, np.arange(500)), 1)
    tok = sample_tokens(logits, allowed, u)
    assert allowed[np.arange(500), tok].all()
    greedy = sample_tokens(logits, allowed, u, top_k=1)
    assert (greedy == np.argmax(np.where(allowed, logits, -np.inf), axis=1)).all()
    nucleus = sample_tokens(logits, allowed, u, top_p=1e-6)
    assert (nucleus == greedy).all()
    hot = sample_tokens(logits, allowed, u, temperature=0.01)
    assert (hot == greedy).mean() > 0.95
    # Uniforms: in [0, 1), reproducible, distinct per row and step.
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 500
    assert (uniforms(row_keys(1, np.arange(500)), 1) == u).all()
    assert not (uniforms(row_keys(1, np.arange(500)), 2) == u).any()


def test_grammar_rejects_infeasible_limits() -> None:
    with pytest.raises(ValueError):
        Grammar(20, 0, 3)
    with pytest.raises(ValueError):
        Grammar(20, 2, 3, max_length=4)
    g = Grammar(20, 2, 3, max_length=10)
    assert g.check_feasible(np.array([0, 3, 4, 5, 7])).tolist() == [True, True, True, False,
                                                                    False]


def test_app_decoding_imports_no_torch() -> None:
    code = ("import sys, app.decoding, app.decoding.engine; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("strategy", ["plain", "cooccurrence", "rerank", "retrieve_edit"])
def test_empty_request_gives_no_patients(world, strategy) -> None:
    assert _engine(world).generate([], strategy).patients == []


def test_two_stage_plan_draws_follow_the_histograms() -> None:
    from app.decoding.two_stage import LengthPlan

    plan = LengthPlan({1: 60, 2: 30, 3: 10, 0: 5}, {"1": 2, "2": 1})
    keys = row_keys(11, np.arange(20_000))
    visits = plan.visits(keys)
    assert set(np.unique(visits)) == {1, 2, 3}  # zero-length patients are not plans
    assert np.bincount(visits, minlength=4)[1:] / visits.size == pytest.approx(
        [0.6, 0.3, 0.1], abs=0.015)
    codes = plan.codes(keys, np.zeros(keys.size, dtype=np.int64))
    assert np.mean(codes == 1) == pytest.approx(2 / 3, abs=0.015)
    # each visit of a row has its own draw, and a row's draws depend on its key only
    later = plan.codes(keys, np.ones(keys.size, dtype=np.int64))
    assert not np.array_equal(codes, later)
    assert np.array_equal(plan.visits(keys[::-1]), visits[::-1])
    assert LengthPlan.from_stats({"visits_per_patient": {}}) is None


@pytest.mark.parametrize("strategy", ["plain", "cooccurrence", "rerank"])
def test_two_stage_generates_the_planned_lengths(world, strategy) -> None:
    from app.decoding.two_stage import LengthPlan

    _, vocab, _, _ = world
    plan = LengthPlan({2: 1, 3: 1}, {2: 1})  # two or three visits of exactly two codes
    engine = _engine(world, length_plan=plan)
    demo = [(50.0, "F"), (70.0, "M")] * 40
    params = {"two_stage": True}
    result = engine.generate(demo, strategy, params, seed=4)
    visits = [len(p.visits) for p in result.patients]
    assert set(visits) == {2, 3}
    assert all(len(v) == 2 for p in result.patients for v in p.visits)
    for tokens in result.token_ids:
        _check_structure(vocab, tokens, 4, 5, 64)
    # one request alone and the same rows decoded in one batch give the same patients
    alone = engine.generate(demo[:3], strategy, params, seed=4)
    assert [p.visits for p in alone.patients] == [p.visits for p in result.patients[:3]]
    # without the flag the untrained model's own lengths come back
    free = engine.generate(demo, strategy, seed=4)
    assert {len(p.visits) for p in free.patients} != {2, 3} or \
        any(len(v) != 2 for p in free.patients for v in p.visits)


def test_two_stage_needs_the_histograms(world) -> None:
    engine = _engine(world)
    with pytest.raises(InvalidParametersError, match="two_stage"):
        engine.generate([(50.0, "F")], "plain", {"two_stage": True}, seed=1)


@pytest.mark.parametrize("order", ["hierarchy", "frequency"])
def test_fixed_code_order_is_decoded_under_that_order(world, order) -> None:
    from app.vocab import code_rank

    _, vocab, _, _ = world
    rank = code_rank(vocab, order)
    engine = _engine(world, code_order=order)
    demo = _demographics(600, seed=3)
    result = engine.generate(demo, "plain", seed=9)
    for tokens in result.token_ids:
        _check_structure(vocab, tokens, 4, 5, 64)
    for patient in result.patients:
        for visit in patient.visits:
            ranks = [rank[vocab.index[c]] for c in visit]
            assert ranks == sorted(ranks), (order, visit)
    # the untrained model, unconstrained, does emit codes out of that order
    free = _engine(world).generate(demo, "plain", seed=9)
    assert any([rank[vocab.index[c]] for c in v] != sorted(rank[vocab.index[c]] for c in v)
               for p in free.patients for v in p.visits)
    # a required code of low rank stays placeable after higher-ranked ones
    lowest = min(COMMON, key=lambda c: rank[vocab.index[c]])
    must = engine.generate([(50.0, "F")] * 200, "plain", seed=2, must_include=[lowest])
    assert all(any(lowest in v for v in p.visits) for p in must.patients)
