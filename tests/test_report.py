"""The protocol driver (training/evaluate.py) and the report (training/report/) on a small
cohort with a stand-in generator."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from app.corpus import Patient
from app.evaluation import independent_marginals_sampler
from app.icd9.edits import load_edits
from training.evaluate import (
    BASELINE,
    FLOOR,
    MODEL_ALONE_SUFFIX,
    derive_seed,
    evaluate_cohorts,
    protocol_cohorts,
    protocol_demographics,
    run_protocol,
)
from training.report import write_report
from training.report.tables import markdown_table, print_table

pytest.importorskip("matplotlib")


def _corpus(n: int, seed: int) -> list[Patient]:
    rng = np.random.default_rng(seed)
    pool = ["250", "401", "428", "414", "427", "584", "599", "486", "V270", "185"]
    w = np.array([9, 8, 6, 5, 4, 3, 3, 2, 1, 1], dtype=float)
    out = []
    for i in range(n):
        sex = "F" if i % 2 else "M"
        codes = [c for c in pool if not (c == "V270" and sex == "M") and not
                 (c == "185" and sex == "F")]
        p = np.array([w[pool.index(c)] for c in codes])
        visits = tuple(tuple(rng.choice(codes, rng.integers(1, 4), replace=False, p=p / p.sum()))
                       for _ in range(rng.integers(1, 3)))
        out.append(Patient(f"p{seed}-{i}", float(rng.integers(20, 90)), sex, visits))
    return out


TRAIN = _corpus(400, 0)
TEST = _corpus(120, 1)


class FakeEngine:
    """Stands in for the decoding engine: marginal sampling, plus a male-only-invalid pregnancy
    code when the validity mask is off."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, bool]] = []

    def __call__(self, strategy, demographics, seed, *, validity_mask=True):
        self.calls.append((strategy, len(demographics), seed, validity_mask))
        out = independent_marginals_sampler(TRAIN, len(demographics), demographics, seed=seed)
        if validity_mask:  # drop what the MCE edits forbid, as the mask would have
            edits = load_edits()
            out = [Patient(p.patient_id, p.age, p.sex, tuple(
                tuple(c for c in v if edits.is_valid(c, p.age, p.sex)) or ("401",)
                for v in p.visits)) for p in out]
        else:
            out = [Patient(p.patient_id, p.age, p.sex,
                           ((*p.visits[0], "V220"),) + p.visits[1:] if p.sex == "M"
                           and "V220" not in p.visits[0] else p.visits)
                   for p in out]
        return out


def test_protocol_cohorts_condition_on_test_and_add_references():
    engine = FakeEngine()
    cohorts = protocol_cohorts(TEST, TRAIN, engine, ["plain", "rerank"], seed=3, chunk_size=50,
                               progress=False)
    assert list(cohorts) == ["plain", "rerank", "plain" + MODEL_ALONE_SUFFIX, FLOOR, BASELINE]
    for name, patients in cohorts.items():
        assert len(patients) == len(TEST)
    for name in ("plain", "rerank"):
        assert [(p.age, p.sex) for p in cohorts[name]] == protocol_demographics(TEST)
    # chunks of 50, 50, 20 per strategy, each with its own seed
    plain = [c for c in engine.calls if c[0] == "plain" and c[3]]
    assert [c[1] for c in plain] == [50, 50, 20]
    assert len({c[2] for c in plain}) == 3
    assert plain[0][2] == derive_seed(3, "plain", 0)
    assert {p.patient_id for p in cohorts[FLOOR]} <= {p.patient_id for p in TRAIN}


def test_protocol_cohorts_without_engine_gives_floor_and_baseline():
    cohorts = protocol_cohorts(TEST, TRAIN, progress=False)
    assert list(cohorts) == [FLOOR, BASELINE]
    with pytest.raises(ValueError):
        protocol_cohorts(TEST, TRAIN, None, ["plain"], progress=False)


def test_wrong_count_from_the_engine_is_an_error():
    def short(strategy, demographics, seed, *, validity_mask=True):
        return independent_marginals_sampler(TRAIN, len(demographics) - 1, None, seed)

    with pytest.raises(ValueError, match="asked for"):
        protocol_cohorts(TEST, TRAIN, short, ["plain"], progress=False)


def test_evaluate_cohorts_folds_model_alone_validity():
    cohorts = protocol_cohorts(TEST, TRAIN, FakeEngine(), ["plain", "rerank"],
                               progress=False)
    rows = evaluate_cohorts(cohorts, TEST, TRAIN)
    assert list(rows) == ["plain", "rerank", FLOOR, BASELINE]
    assert rows["plain"]["validity"] == 1.0
    assert rows["plain"]["validity_model_alone"] < 1.0  # V220 for the men
    assert "validity_model_alone" not in rows["rerank"]
    assert rows[FLOOR]["validity_model_alone"] == rows[FLOOR]["validity"]
    assert rows[FLOOR]["exact_copy_rate"] == 1.0 and rows[FLOOR]["dcr_mean"] == 0.0


def test_run_protocol_writes_a_self_contained_report(tmp_path):
    from rich.console import Console

    console = Console(record=True, width=160)
    result = run_protocol(TEST, TRAIN, generate_fn=FakeEngine(), strategies=["plain"],
                          out_dir=tmp_path, meta={"source": "uci", "bundle": "models/x"},
                          console=console, progress=True, chunk_size=40)
    text = console.export_text()
    assert "generating plain" in text  # the progress bar
    assert "JSD" in text and "bigram R2" in text and "floor" in text and "target" in text
    paths = result.paths
    assert {p.name for p in paths.values()} == {"report.json", "report.html", "report.md"}
    doc = json.loads(paths["json"].read_text())
    assert doc["order"] == ["plain", FLOOR, BASELINE]
    assert doc["meta"]["source"] == "uci" and "Strack" in doc["meta"]["source_citation"]
    assert doc["checks"]["plain"]["well_formed"] is True
    assert set(doc["rows"]["plain"]) >= {"jsd", "top100_overlap", "unigram_r2", "bigram_r2",
                                         "cooccurrence_score", "ks_visits_per_patient",
                                         "ks_codes_per_visit", "validity",
                                         "validity_model_alone", "well_formed",
                                         "exact_copy_rate", "exact_copy_rate_test",
                                         "dcr_mean", "mia_auc", "generation_seconds"}
    # the newer metrics, with both reference rows computed in the same run
    for name in ("plain", FLOOR, BASELINE):
        assert set(doc["rows"][name]) >= {
            "sequential_r2", "tail_jsd", "tail_unigram_r2", "tail_distinct_codes",
            "distinct_codes_test", "stratum_jsd_worst", "stratum_unigram_r2_worst",
            "detection_auc", "tstr_auroc", "tstr_auroc_real", "attr_inference_f1",
            "attr_inference_f1_holdout", "bigram_r2_gap_closed"}, name
    assert doc["rows"][FLOOR]["bigram_r2_gap_closed"] == pytest.approx(1.0)
    assert doc["rows"][BASELINE]["bigram_r2_gap_closed"] == pytest.approx(0.0)
    # the real floor is hard to tell from real test; independent marginals are easier
    assert doc["rows"][FLOOR]["detection_auc"] < doc["rows"][BASELINE]["detection_auc"]
    assert doc["details"]["utility_task"]["category"]
    assert doc["details"]["strata"]["plain"]
    # targets judged against this run's floor: the JSD bound is 1.25 x the floor's JSD
    jsd_target = next(t for t in doc["targets"] if t["metric"] == "jsd")
    assert jsd_target["kind"] == "floor_ratio"
    assert jsd_target["bound"] == pytest.approx(1.25 * doc["rows"][FLOOR]["jsd"])
    assert doc["checks"]["plain"]["jsd"] is (doc["rows"]["plain"]["jsd"]
                                             <= jsd_target["bound"] + 1e-12)
    assert doc["meta"]["targets"] == "relative"
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 7
    # the page opens with the verdict, before the full table and the figures
    assert page.index('id="verdict"') < page.index("<h2>Metrics</h2>") < page.index("<figure")
    assert "of baseline-to-floor gap" in page and "Sequential fidelity" in page
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)  # nothing external
    assert "<script" not in page
    assert "Strack" in page and "uci" in page
    assert "bigram R2" in page and "pass" in page
    md = paths["md"].read_text()
    assert "| plain |" in md and "| target |" in md


def test_markdown_and_terminal_tables_mark_targets():
    rows = {"plain": {"jsd": 0.05, "bigram_r2": 0.95},
            FLOOR: {"jsd": 0.012, "bigram_r2": 0.94}}
    md = markdown_table(rows)
    assert "0.0500 ✗" in md and "0.950 |" in md and md.index("plain") < md.index("floor")
    from rich.console import Console

    console = Console(record=True, width=120)
    print_table(rows, console=console)
    out = console.export_text()
    assert "✗" in out and "✓" in out


def test_write_report_without_cohorts(tmp_path):
    rows = {FLOOR: {"jsd": 0.01}}
    paths = write_report(tmp_path, rows, {}, TEST, TRAIN, {"source": "generic"})
    assert paths["html"].exists()
    assert json.loads(paths["json"].read_text())["meta"]["split_sizes"] == {"test": 120,
                                                                          "train": 400}
