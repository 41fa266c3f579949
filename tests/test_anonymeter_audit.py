"""The Anonymeter audit (training/anonymeter_audit.py): the flattened table, and the three
evaluators run in the audit interpreter (scripts/audit_venv.sh) on a released copy of the
original records against an independent cohort."""

from __future__ import annotations

import math

import numpy as np

from app.corpus import Patient
from training.anonymeter_audit import COLUMNS, RISKS, find_python, flatten, run_audit


def _corpus(n: int, seed: int) -> list[Patient]:
    rng = np.random.default_rng(seed)
    pool = ["250", "401", "428", "2962", "V270", "486", "8540", "185", "599", "714", "0389"]
    return [Patient(f"p{seed}-{i}", float(rng.integers(20, 90)), "F" if i % 2 else "M",
                    tuple(tuple(rng.choice(pool, rng.integers(1, 4), replace=False))
                          for _ in range(rng.integers(1, 3)))) for i in range(n)]


def test_flatten_is_demographics_visits_and_chapter_flags():
    row = flatten([Patient("a", 67.0, "F", (("25000", "4019"), ("2962",), ("E8889",)))])[0]
    table = dict(zip(COLUMNS, row))
    assert (table["age"], table["sex"], table["n_visits"]) == (67.0, "F", 3)
    flagged = {k for k, v in table.items() if k.startswith("ch_") and v == 1}
    assert flagged == {"ch_240", "ch_390", "ch_290", "ch_E000"}
    assert len(COLUMNS) == 3 + 19


def test_audit_flags_a_released_copy_of_the_originals():
    train, test = _corpus(300, 0), _corpus(300, 1)
    python, status = find_python()
    rows, status = run_audit({"copy": train, "independent": _corpus(300, 2)}, train, test,
                             n_attacks=150, seed=0)
    if python is None:  # no interpreter with anonymeter: a clear reason, no numbers
        assert "scripts/audit_venv.sh" in status
        assert all(math.isnan(v) for row in rows.values() for v in row.values())
        return
    assert "anonymeter via" in status or "this environment" in status
    for name in ("copy", "independent"):
        for risk in RISKS:
            value = rows[name][f"anonymeter_{risk}"]
            assert rows[name][f"anonymeter_{risk}_ci_low"] <= value, (name, risk)
            assert value <= rows[name][f"anonymeter_{risk}_ci_high"], (name, risk)
    # the copy is the original table itself: linking and inferring from it beats the control
    copy, other = rows["copy"], rows["independent"]
    assert copy["anonymeter_linkability"] > other["anonymeter_linkability"]
    assert copy["anonymeter_inference"] > other["anonymeter_inference"]
    assert copy["anonymeter_inference"] > 0.05
