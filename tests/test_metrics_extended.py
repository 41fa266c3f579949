"""The newer protocol metrics on hand-computed cases (app/evaluation/breakdown.py,
learned.py, extended.py) and the reference-relative targets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.corpus import Patient
from app.evaluation import (
    RELATIVE_TARGETS,
    UCI_TARGETS,
    ExtendedReference,
    Target,
    add_gap_shares,
    check_targets,
    extended_metrics,
    gap_closed,
    jsd_from_counts,
    long_tail_metrics,
    sequential_r2,
    stratum_label,
    stratum_metrics,
    tail_codes,
)

pytest.importorskip("sklearn")

from app.evaluation import attribute_inference_f1, choose_utility_task, detection_auc, tstr_auroc


def P(pid: str, *visits: tuple[str, ...], age: float = 60.0, sex: str = "F") -> Patient:
    return Patient(pid, age, sex, tuple(tuple(v) for v in visits))


# -- sequential R2 -----------------------------------------------------------------------------

REAL_SEQ = [P("a", ("250",), ("401",)), P("b", ("250",), ("428",)), P("c", ("250",), ("401",))]


def test_sequential_r2_hand_computed():
    # real: N(250) = 3, P(401 | 250) = 2/3, P(428 | 250) = 1/3; synthetic: P(401 | 250) = 1.
    # y = (2/3, 1/3), yhat = (1, 0): SS_tot = 2 (1/6)^2 = 1/18, SS_res = 2/9 -> R2 = -3.
    synth = [P("x", ("250",), ("401",)), P("y", ("250",), ("401",))]
    assert sequential_r2(REAL_SEQ, synth, min_support=1) == pytest.approx(-3.0)
    assert sequential_r2(REAL_SEQ, REAL_SEQ, min_support=1) == pytest.approx(1.0)


def test_sequential_r2_counts_a_missing_code_as_zero_and_needs_support():
    # No synthetic transition from 250: yhat = (0, 0), SS_res = 4/9 + 1/9 -> R2 = 1 - 10 = -9.
    synth = [P("x", ("401",), ("428",))]
    assert sequential_r2(REAL_SEQ, synth, min_support=1) == pytest.approx(-9.0)
    assert math.isnan(sequential_r2(REAL_SEQ, synth, min_support=4))  # N_real(250) = 3 < 4
    single = [P("s", ("250", "401"))]
    assert math.isnan(sequential_r2(single, single, min_support=1))


# -- long tail ---------------------------------------------------------------------------------

def test_tail_is_below_the_median_training_frequency():
    # frequencies 250: 5, 401: 3, 428: 1, 414: 1 -> median 2 -> tail {428, 414}
    train = [P(f"t{i}", ("250",)) for i in range(5)] + [P(f"u{i}", ("401",)) for i in range(3)]
    train += [P("v", ("428", "414"))]
    assert tail_codes(train) == {"428", "414"}


def test_long_tail_metrics_hand_computed():
    tail = {"428", "414"}
    real = [P("a", ("428", "250")), P("b", ("414",)), P("c", ("428",))]  # 428: 2, 414: 1
    synth = [P("x", ("428",)), P("y", ("250",))]  # 428: 1, 414: 0
    m = long_tail_metrics(real, synth, tail)
    assert m["tail_jsd"] == pytest.approx(jsd_from_counts(np.array([2, 1]), np.array([1, 0])))
    # prevalence over 3 real and 2 synthetic visits: y = (2/3, 1/3), yhat = (1/2, 0)
    y, yhat = np.array([2 / 3, 1 / 3]), np.array([1 / 2, 0])
    expected = 1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2)
    assert m["tail_unigram_r2"] == pytest.approx(expected)
    assert (m["tail_distinct_codes"], m["tail_distinct_codes_test"]) == (1.0, 2.0)
    assert m["distinct_codes_test"] == 3.0 and m["tail_codes"] == 2.0


# -- strata ------------------------------------------------------------------------------------

def test_stratum_metrics_finds_the_worst_stratum():
    real = [P("a", ("250",), age=70), P("b", ("401",), age=70),
            P("c", ("V270",), age=30), P("d", ("650",), age=30, sex="F")]
    synth = [P("x", ("250",), age=71), P("y", ("401",), age=72),  # 65-74 F: identical
             P("z", ("V270",), age=31), P("w", ("V220",), age=32)]  # 18-44 F: half disjoint
    summary, strata = stratum_metrics(real, synth, min_patients=2)
    by_label = {s["stratum"]: s for s in strata}
    assert by_label[stratum_label(3, "F")]["jsd"] == pytest.approx(0.0)
    # 18-44 F: p = (V270 1/2, 650 1/2, V220 0), q = (1/2, 0, 1/2): JSD = 0.5
    expected = jsd_from_counts(np.array([1, 1, 0]), np.array([1, 0, 1]))
    assert expected == pytest.approx(0.5)
    assert summary["stratum_jsd_worst"] == pytest.approx(expected)
    assert summary["stratum_worst"] == "18-44 F"
    assert summary["stratum_jsd_mean"] == pytest.approx(0.25)  # 2 real patients each
    assert summary["strata_scored"] == 2.0
    summary, _ = stratum_metrics(real, synth, min_patients=3)
    assert math.isnan(summary["stratum_jsd_worst"])


# -- learned metrics ---------------------------------------------------------------------------

def _random_cohort(n: int, seed: int, pool=("250", "401", "428", "414", "427", "584")):
    rng = np.random.default_rng(seed)
    return [P(f"r{seed}-{i}", tuple(rng.choice(pool, 2, replace=False)),
              age=float(rng.integers(20, 90)), sex="F" if i % 2 else "M") for i in range(n)]


def test_detection_auc_separable_and_indistinguishable():
    real = [P(f"a{i}", ("250", "401"), age=50 + i % 20) for i in range(60)]
    fake = [P(f"b{i}", ("428", "414"), age=50 + i % 20) for i in range(60)]
    assert detection_auc(real, fake) == pytest.approx(1.0)
    same_a, same_b = _random_cohort(400, 1), _random_cohort(400, 2)
    assert abs(detection_auc(same_a, same_b) - 0.5) < 0.1
    assert math.isnan(detection_auc(real[:3], fake[:3]))


def test_choose_utility_task_takes_the_share_closest_to_a_quarter():
    # 250 in 4/4 patients, 401 in 1/4, 428 in 2/4 -> 401 (share 0.25)
    train = [P("a", ("25000", "40191")), P("b", ("25001",)), P("c", ("25002", "4280")),
             P("d", ("25000", "4281"))]
    assert choose_utility_task(train) == ("401", 0.25)


def _rule(n: int, seed: int, inverse: bool = False) -> list[Patient]:
    """428 carried exactly by the patients with 401 (or by those without, ``inverse``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        has = bool(rng.integers(0, 2))
        codes = ["250"] + (["401"] if has else ["414"])
        if has != inverse:
            codes.append("4280")
        out.append(P(f"p{seed}-{i}", tuple(codes)))
    return out


def test_tstr_learns_the_rule_and_fails_on_its_inverse():
    test = _rule(200, 1)
    assert tstr_auroc(_rule(200, 2), test, "428") == pytest.approx(1.0)
    assert tstr_auroc(_rule(200, 3, inverse=True), test, "428") == pytest.approx(0.0)
    one_class = [P(f"o{i}", ("250",)) for i in range(20)]
    assert tstr_auroc(one_class, test, "428") == 0.5


def test_attribute_inference_copy_and_flipped_release():
    targets = [P(f"t{i}", (f"{400 + i:03d}",) + (("2962",) if i % 2 else ()), age=60)
               for i in range(10)]
    # Releasing the targets themselves: the nearest record is the target -> F1 = 1.
    assert attribute_inference_f1(targets, targets) == pytest.approx(1.0)
    flipped = [P(f"f{i}", (f"{400 + i:03d}",) + (() if i % 2 else ("2962",)), age=60)
               for i in range(10)]
    assert attribute_inference_f1(flipped, targets) == pytest.approx(0.0)
    assert math.isnan(attribute_inference_f1([], targets))


def test_extended_metrics_rows_and_gap_shares():
    train, test = _random_cohort(300, 5), _random_cohort(150, 6)
    ref = ExtendedReference.build(test, train, seed=1, attack_size=50)
    assert ref.utility_category is not None and len(ref.attack_targets) == 50
    numbers, detail = extended_metrics(_random_cohort(150, 7), ref)
    for key in ("sequential_r2", "tail_jsd", "stratum_jsd_worst", "detection_auc",
                "tstr_auroc", "tstr_auroc_real", "attr_inference_f1",
                "attr_inference_f1_holdout", "distinct_codes_test"):
        assert key in numbers, key
    assert 0.3 < numbers["detection_auc"] < 0.7
    assert detail["strata"] and isinstance(detail["stratum_worst"], str)
    rows = {"m": {"bigram_r2": 0.8}, "floor": {"bigram_r2": 0.9},
            "baseline": {"bigram_r2": 0.5}}
    add_gap_shares(rows)
    assert rows["m"]["bigram_r2_gap_closed"] == pytest.approx(0.75)
    assert rows["floor"]["bigram_r2_gap_closed"] == pytest.approx(1.0)


# -- targets relative to the run's references ---------------------------------------------------

def test_relative_targets_use_the_floor_and_baseline_rows():
    refs = {"floor": {"jsd": 0.04, "bigram_r2": 0.85, "unigram_r2": 0.99,
                      "detection_auc": 0.52},
            "baseline": {"jsd": 0.05, "bigram_r2": 0.45, "unigram_r2": 0.985,
                         "detection_auc": 0.9}}
    # jsd bound 1.25 x 0.04 = 0.05; bigram bound 0.45 + 0.75 x 0.40 = 0.75;
    # unigram: gap bound 0.98875, but within 0.01 of the floor (0.98) also passes.
    row = {"jsd": 0.049, "bigram_r2": 0.76, "unigram_r2": 0.981, "detection_auc": 0.61}
    checks = check_targets(row, RELATIVE_TARGETS, refs)
    assert checks["jsd"] and checks["bigram_r2"] and checks["unigram_r2"]
    assert checks["detection_auc"] is True  # <= 0.52 + 0.10
    worse = {"jsd": 0.051, "bigram_r2": 0.74, "unigram_r2": 0.979, "detection_auc": 0.63}
    checks = check_targets(worse, RELATIVE_TARGETS, refs)
    assert not any(checks[k] for k in ("jsd", "bigram_r2", "unigram_r2", "detection_auc"))
    assert check_targets(row, RELATIVE_TARGETS)["jsd"] is None  # no references: not measured
    # the same row under UCI's absolute profile: jsd <= 0.03 fails, detection <= 0.60 fails
    uci = check_targets(row, UCI_TARGETS, refs)
    assert uci["jsd"] is False and uci["detection_auc"] is False
    assert gap_closed(0.76, 0.85, 0.45) == pytest.approx(0.775)
    assert math.isnan(gap_closed(0.9, 0.9, 0.9))
    assert "floor" in Target("jsd", "<=", 1.25, kind="floor_ratio").describe()
