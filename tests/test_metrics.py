"""The protocol's metrics on small hand-computed cases (app/evaluation/)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from app.corpus import Patient
from app.evaluation import (
    PROTOCOL_TARGETS,
    CodeIndex,
    bigram_r2,
    check_targets,
    code_jsd,
    cooccurrence_score,
    dcr_summary,
    distance_to_closest_record,
    evaluate_cohort,
    exact_copy_rate,
    independent_marginals_sampler,
    invalid_codes,
    jsd_from_counts,
    ks_codes_per_visit,
    ks_visits_per_patient,
    membership_inference_auc,
    nearest_jaccard_distance,
    pair_counts,
    patient_matrix,
    rank_auc,
    real_floor_sample,
    top_k_codes,
    top_k_overlap,
    unigram_r2,
    validity,
    visit_matrix,
    well_formed_patient,
    well_formed_rate,
    well_formed_token_rate,
    well_formed_tokens,
)


def P(pid: str, *visits: tuple[str, ...], age: float = 60.0, sex: str = "F") -> Patient:
    return Patient(pid, age, sex, tuple(tuple(v) for v in visits))


# The known 3-patient example (values worked out by hand in the comments).
TEST = [
    P("t1", ("250", "401")),
    P("t2", ("250", "401", "428")),
    P("t3", ("428",), ("250", "401")),
]
# test pair counts: {250,401}: 3 visits, {250,428}: 1, {401,428}: 1
TRAIN = [
    P("r1", ("250", "401")),
    P("r2", ("428",), ("414",)),
    P("r3", ("250", "401", "428", "414")),
]
SYNTH = [
    P("s1", ("401", "250")),            # the same record as r1 (codes as sets): a copy, DCR 0
    P("s2", ("401", "428")),            # nearest r3: |{401,428}| / |{250,401,428,414}| -> 0.5
    P("s3", ("414",), ("250",), ("428",)),  # {250,414,428} vs r3: 1 - 3/4 = 0.25
]


# -- JSD, top-k, R2 ----------------------------------------------------------------------------

def test_identical_distributions_give_jsd_0_and_r2_1():
    other = [P("x" + p.patient_id, *p.visits) for p in TEST]
    assert code_jsd(TEST, other) == pytest.approx(0.0, abs=1e-12)
    assert unigram_r2(TEST, other) == pytest.approx(1.0)
    assert bigram_r2(TEST, other) == pytest.approx(1.0)
    assert top_k_overlap(TEST, other) == 1.0


def test_disjoint_distributions_give_jsd_1():
    a = [P("a", ("250", "401"))]
    b = [P("b", ("V270", "650"))]
    assert code_jsd(a, b) == pytest.approx(1.0)
    assert top_k_overlap(a, b) == 0.0


def test_jsd_is_base2_divergence_not_distance():
    # p = (1, 0), q = (1/2, 1/2): JSD = 0.5 log2(4/3) + 0.25 log2(2/3) + 0.25 log2(2) = 0.3113
    expected = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    assert jsd_from_counts(np.array([2, 0]), np.array([1, 1])) == pytest.approx(expected)
    assert expected == pytest.approx(jensenshannon([1, 0], [0.5, 0.5], base=2) ** 2)
    a = [P("a", ("250",)), P("b", ("250",))]
    b = [P("c", ("250",)), P("d", ("401",))]
    assert code_jsd(a, b) == pytest.approx(expected)


def test_top_k_ties_are_broken_by_code():
    counts = Counter({"428": 3, "401": 2, "250": 2, "414": 1})
    assert top_k_codes(counts, 2) == ["428", "250"]
    real = [P("a", ("428", "401", "250")), P("b", ("428", "401", "250")), P("c", ("428",))]
    synth = [P("d", ("428", "250", "401")), P("e", ("428", "250", "401")), P("f", ("428",))]
    assert top_k_overlap(real, synth, k=2) == 1.0
    # Jaccard: {428, 250} vs {428, 401} -> 1/3
    synth2 = [P("d", ("428", "401")), P("e", ("428", "401")), P("f", ("428", "250"))]
    assert top_k_overlap(real, synth2, k=2) == pytest.approx(1 / 3)


def test_unigram_r2_uses_the_union_of_codes():
    # real per-visit prevalence a 1, b 0.5; synthetic a 0.5, c 0.5 (c invented):
    # y (a, b, c) = (1, .5, 0), yhat = (.5, 0, .5); SS_res .75, SS_tot .5 -> R2 = -0.5
    real = [P("r", ("250", "401"), ("250",))]
    synth = [P("s", ("250",), ("428",))]
    assert unigram_r2(real, synth) == pytest.approx(-0.5)


def test_bigram_r2_matches_a_dense_computation():
    rng = np.random.default_rng(3)
    pool = [f"{i:03d}" for i in range(1, 30)]

    def cohort(n, p):
        return [P(f"p{i}", *[tuple(rng.choice(pool, rng.integers(1, 5), replace=False, p=p))
                             for _ in range(rng.integers(1, 3))]) for i in range(n)]

    w = np.linspace(1, 3, len(pool))
    real, synth = cohort(80, w / w.sum()), cohort(70, w[::-1] / w.sum())

    def prevalence(ps):
        pairs = Counter()
        visits = [set(v) for p in ps for v in p.visits]
        for v in visits:
            s = sorted(v)
            pairs.update((a, b) for i, a in enumerate(s) for b in s[i + 1:])
        return {k: n / len(visits) for k, n in pairs.items()}

    pr, ps = prevalence(real), prevalence(synth)
    keys = sorted(set(pr) | set(ps))
    y = np.array([pr.get(k, 0) for k in keys])
    yhat = np.array([ps.get(k, 0) for k in keys])
    expected = 1 - ((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert bigram_r2(real, synth) == pytest.approx(expected)
    # and the evaluate_cohort path (shared reference, growing index) agrees
    row = evaluate_cohort(synth, real, real)
    assert row["bigram_r2"] == pytest.approx(expected)


def test_pair_counts_are_visit_counts_of_unordered_pairs():
    index = CodeIndex()
    counts = pair_counts(visit_matrix(TEST, index))
    dense = counts.toarray()
    i = {c: index.get(c) for c in ("250", "401", "428")}

    def at(a, b):
        a, b = sorted((i[a], i[b]))
        return dense[a, b]

    assert at("250", "401") == 3 and at("250", "428") == 1 and at("401", "428") == 1
    assert np.tril(dense).sum() == 0


# -- the 3-patient example ---------------------------------------------------------------------

def test_cooccurrence_score_on_the_known_example():
    # visits: {250,401} -> 3, {401,428} -> 1, three one-code visits -> 0; 4 / 5 visits
    assert cooccurrence_score(SYNTH, TEST) == pytest.approx(0.8)


def test_ks_on_the_known_example():
    # visits per patient: test (1,1,2), synth (1,1,3): ECDFs differ by 1/3 at 2
    assert ks_visits_per_patient(TEST, SYNTH) == pytest.approx(1 / 3)
    # codes per visit: test (2,3,1,2), synth (2,2,1,1,1): at 1, 1/4 vs 3/5 -> 0.35
    assert ks_codes_per_visit(TEST, SYNTH) == pytest.approx(0.35)


def test_exact_copy_rate_on_the_known_example():
    assert exact_copy_rate(SYNTH, TRAIN) == pytest.approx(1 / 3)
    assert exact_copy_rate(TEST, TRAIN) == pytest.approx(1 / 3)  # t1 is r1
    # visit order is kept: the same visits in another order are not a copy
    assert exact_copy_rate([P("x", ("414",), ("428",))], TRAIN) == 0.0
    assert exact_copy_rate([P("x", ("428",), ("414",))], TRAIN) == 1.0


def test_dcr_on_the_known_example():
    d = distance_to_closest_record(SYNTH, TRAIN)
    assert d == pytest.approx([0.0, 0.5, 0.25])
    summary = dcr_summary(d)
    assert summary == pytest.approx({"dcr_mean": 0.25, "dcr_median": 0.25,
                                     "dcr_zero_share": 1 / 3})


def test_evaluate_cohort_on_the_known_example():
    row = evaluate_cohort(SYNTH, TEST, TRAIN)
    assert row["cooccurrence_score"] == pytest.approx(0.8)
    assert row["ks_visits_per_patient"] == pytest.approx(1 / 3)
    assert row["ks_codes_per_visit"] == pytest.approx(0.35)
    assert row["exact_copy_rate"] == pytest.approx(1 / 3)
    assert row["exact_copy_rate_test"] == pytest.approx(1 / 3)
    assert row["dcr_mean"] == pytest.approx(0.25)
    assert row["dcr_zero_share"] == pytest.approx(1 / 3)
    assert row["validity"] == 1.0 and row["well_formed"] == 1.0
    assert row["n_patients"] == 3 and row["n_visits"] == 5
    assert row["over_length_visits"] == 0.0  # longest training visit has 4 codes
    assert 0.0 <= row["mia_auc"] <= 1.0
    assert row["jsd"] == pytest.approx(code_jsd(TEST, SYNTH))
    assert row["unigram_r2"] == pytest.approx(unigram_r2(TEST, SYNTH))
    assert row["top100_overlap"] == pytest.approx(top_k_overlap(TEST, SYNTH))


def test_nearest_jaccard_distance_in_blocks_matches_brute_force():
    rng = np.random.default_rng(0)
    pool = [f"{i:03d}" for i in range(1, 40)]
    q = [P(f"q{i}", tuple(rng.choice(pool, rng.integers(1, 6), replace=False)))
         for i in range(37)]
    b = [P(f"b{i}", tuple(rng.choice(pool, rng.integers(1, 6), replace=False)))
         for i in range(53)]
    index = CodeIndex()
    mq, mb = patient_matrix(q, index), patient_matrix(b, index)
    got = nearest_jaccard_distance(mq, mb, block_elements=100)  # ~2 queries per block
    sets_b = [{c for v in p.visits for c in v} for p in b]
    expected = [min(1 - len(s & t) / len(s | t) for t in sets_b)
                for s in ({c for v in p.visits for c in v} for p in q)]
    assert got == pytest.approx(expected, abs=1e-6)


# -- membership inference ----------------------------------------------------------------------

def test_rank_auc_counts_ties_as_half():
    assert rank_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert rank_auc(np.array([1.0]), np.array([2.0])) == 0.0
    assert rank_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert rank_auc(np.array([2.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(0.875)


def _random_patients(rng, n, prefix, pool, size=4):
    return [P(f"{prefix}{i}", tuple(rng.choice(pool, size, replace=False))) for i in range(n)]


def test_mia_auc_is_half_when_synthetic_is_independent_of_train():
    rng = np.random.default_rng(1)
    pool = [f"{i:03d}" for i in range(1, 121)]
    members = _random_patients(rng, 300, "m", pool)
    non_members = _random_patients(rng, 300, "n", pool)
    synthetic = _random_patients(rng, 300, "s", pool)
    assert membership_inference_auc(synthetic, members, non_members) == pytest.approx(0.5,
                                                                                      abs=0.08)


def test_mia_auc_is_near_1_when_synthetic_are_the_members():
    rng = np.random.default_rng(2)
    pool = [f"{i:03d}" for i in range(1, 121)]
    members = _random_patients(rng, 200, "m", pool)
    non_members = _random_patients(rng, 200, "n", pool)
    copies = [P("c" + p.patient_id, *p.visits) for p in members]
    assert membership_inference_auc(copies, members, non_members) > 0.97


def test_evaluate_cohort_mia_uses_train_members_and_test_non_members():
    rng = np.random.default_rng(4)
    pool = [f"{i:03d}" for i in range(1, 121)]
    train = _random_patients(rng, 150, "r", pool)
    test = _random_patients(rng, 150, "t", pool)
    leaked = evaluate_cohort([P("c" + p.patient_id, *p.visits) for p in train], test, train)
    assert leaked["mia_auc"] > 0.97 and leaked["exact_copy_rate"] == 1.0
    fresh = evaluate_cohort(_random_patients(rng, 150, "s", pool), test, train)
    assert fresh["mia_auc"] == pytest.approx(0.5, abs=0.1)


# -- validity and structure --------------------------------------------------------------------

def test_validity_under_mce_edits():
    man = P("m", ("V220", "401"), age=30, sex="M")  # V22.0 normal pregnancy: female only
    woman = P("w", ("V220", "401"), age=30, sex="F")
    assert validity([woman]) == 1.0
    assert validity([man]) == 0.5
    assert validity([man, woman]) == 0.75
    (pid, code, reason), = invalid_codes([man, woman])
    assert (pid, code) == ("m", "V220") and "sex" in reason
    child = P("c", ("650",), age=5, sex="F")  # normal delivery: maternity ages 12-55
    assert validity([child]) == 0.0
    assert validity([P("p", ("185",), age=70, sex="M")]) == 1.0  # prostate cancer, a man


def test_well_formed_token_sequences():
    ok = ["<s>", "<v>", "250", "401", "</v>", "<v>", "250", "</v>", "</s>"]
    assert well_formed_tokens(ok)
    assert well_formed_tokens(ok + ["<pad>", "<pad>"])
    assert not well_formed_tokens(ok[:-1])  # never ended
    assert not well_formed_tokens(["<s>", "<v>", "</v>", "</s>"])  # empty visit
    assert not well_formed_tokens(["<s>", "<v>", "250", "250", "</v>", "</s>"])  # repeat
    assert not well_formed_tokens(["<s>", "</s>"])  # no visit
    assert not well_formed_tokens(["<s>", "250", "<v>", "401", "</v>", "</s>"])  # stray code
    assert not well_formed_tokens(["<s>", "<v>", "250", "</s>"])  # unclosed visit
    assert not well_formed_tokens(["<s>", "<v>", "250", "<v>", "401", "</v>", "</s>"])
    assert not well_formed_tokens(["<s>", "<v>", "<mask>", "</v>", "</s>"])
    assert not well_formed_tokens(ok + ["<v>"])  # something after the end
    vocab = ["<pad>", "<s>", "</s>", "<v>", "</v>", "<mask>", "250", "401"]
    assert well_formed_tokens([1, 3, 6, 7, 4, 2, 0], vocab)
    assert well_formed_token_rate([ok, ok[:-1]]) == 0.5


def test_well_formed_patients():
    assert well_formed_patient(P("a", ("250",)))
    assert not well_formed_patient(P("b"))  # no visit
    assert not well_formed_patient(P("c", ("250",), ()))  # empty visit
    assert not well_formed_patient(P("d", ("250", "250")))  # repeated code
    assert well_formed_rate([P("a", ("250",)), P("b")]) == 0.5


# -- references and targets --------------------------------------------------------------------

def test_independent_marginals_sampler_follows_train_marginals():
    rng = np.random.default_rng(5)
    pool = [f"{i:03d}" for i in range(1, 40)]
    w = np.arange(1, len(pool) + 1, dtype=float)
    train = [P(f"r{i}", *[tuple(rng.choice(pool, rng.integers(1, 4), replace=False,
                                            p=w / w.sum()))
                          for _ in range(rng.integers(1, 4))]) for i in range(400)]
    demo = [(float(a), "M" if a % 2 else "F") for a in range(300)]
    out = independent_marginals_sampler(train, 300, demo, seed=1)
    assert len(out) == 300 and [(p.age, p.sex) for p in out] == demo
    assert well_formed_rate(out) == 1.0
    train_sizes = {len(v) for p in train for v in p.visits}
    assert {len(v) for p in out for v in p.visits} <= train_sizes
    assert {len(p.visits) for p in out} <= {len(p.visits) for p in train}
    assert {c for p in out for v in p.visits for c in v} <= set(pool)
    assert code_jsd(train, out) < 0.05
    again = independent_marginals_sampler(train, 300, demo, seed=1)
    assert [p.visits for p in again] == [p.visits for p in out]


def test_independent_marginals_sampler_handles_visits_larger_than_the_frequent_codes():
    train = [P("a", ("001", "002", "003"))] * 50 + [P("b", ("004",))]
    out = independent_marginals_sampler(train, 50, seed=0)
    assert well_formed_rate(out) == 1.0


def test_real_floor_sample_draws_distinct_train_patients():
    train = [P(f"r{i}", ("250",)) for i in range(100)]
    floor = real_floor_sample(train, 30, seed=0)
    assert len({p.patient_id for p in floor}) == 30
    assert real_floor_sample(train, 30, seed=0) == floor


def test_targets():
    row = {"jsd": 0.02, "top100_overlap": 0.85, "unigram_r2": 0.99, "bigram_r2": 0.89,
           "validity": 1.0, "validity_model_alone": 0.995, "well_formed": 1.0,
           "exact_copy_rate": 0.44, "exact_copy_rate_test": 0.425, "mia_auc": 0.61}
    checks = check_targets(row)
    assert checks["jsd"] and checks["top100_overlap"] and checks["unigram_r2"]
    assert checks["bigram_r2"] is False and checks["mia_auc"] is False
    assert checks["exact_copy_rate"] is True  # 0.44 <= 0.425 + 0.02
    assert check_targets({**row, "exact_copy_rate": 0.45})["exact_copy_rate"] is False
    assert check_targets({"jsd": float("nan")})["jsd"] is None
    assert {t.metric for t in PROTOCOL_TARGETS} >= {"jsd", "bigram_r2", "mia_auc"}
