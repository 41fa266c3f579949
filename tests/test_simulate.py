"""The simulated corpus: determinism, MCE validity, recoverable clusters, the generic round trip,
the CLI, and the MIMIC-III-scale preset's size and shape."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from app.cli import app
from app.corpus import corpus_stats
from app.icd9.edits import load_edits
from app.icd9.hierarchy import chapter_of, load_hierarchy
from training.loaders.generic import load_generic
from training.simulate import (
    PRESETS,
    SimulatedCorpus,
    SimulationConfig,
    default_clusters_path,
    simulate_corpus,
    write_generic,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def demo() -> SimulatedCorpus:
    return simulate_corpus("demo", seed=0)


def _patient_codes(sim: SimulatedCorpus) -> list[set[str]]:
    return [{c for v in p.visits for c in v} for p in sim.corpus.patients]


def test_presets_and_shape(demo: SimulatedCorpus) -> None:
    assert set(PRESETS) >= {"demo", "mimic3-scale"}
    assert all(isinstance(c, SimulationConfig) for c in PRESETS.values())
    assert demo.corpus.source == "simulated:demo"
    assert len(demo.corpus.patients) == 2_000
    assert len(demo.clusters) == PRESETS["demo"].n_clusters
    ids = [p.patient_id for p in demo.corpus.patients]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    ages = {p.age for p in demo.corpus.patients}
    assert 0.0 in ages and max(ages) <= 90 and any(1 <= a < 18 for a in ages)
    billable = set(load_hierarchy().billable_codes)
    for patient in demo.corpus.patients:
        assert patient.sex in ("F", "M") and patient.visits
        for visit in patient.visits:
            assert visit and len(set(visit)) == len(visit)
            assert set(visit) <= billable
    stats = corpus_stats(demo.corpus.patients)
    assert 4.5 < stats.mean_codes_per_visit < 6.5
    assert 1.3 < stats.mean_visits_per_patient < 1.7


def test_same_seed_same_corpus(demo: SimulatedCorpus) -> None:
    again = simulate_corpus("demo", seed=0)
    assert again.corpus.patients == demo.corpus.patients
    assert again.clusters == demo.clusters
    assert again.clusters_to_json() == demo.clusters_to_json()
    other = simulate_corpus("demo", seed=1)
    assert other.corpus.patients != demo.corpus.patients


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        simulate_corpus("nope")


def test_every_code_passes_mce_edits(demo: SimulatedCorpus) -> None:
    edits = load_edits()
    sim = simulate_corpus("demo", seed=7)  # a second seed for more demographic corners
    for corpus in (demo.corpus, sim.corpus):
        for patient in corpus.patients:
            for visit in patient.visits:
                for code in visit:
                    assert edits.is_valid(code, patient.age, patient.sex), (patient, code)
                    if chapter_of(code).index == 14:  # perinatal: newborns only
                        assert patient.age == 0, (patient, code)
    patients = demo.corpus.patients
    # Age and sex effects are there, not just allowed: men never get pregnancy codes while
    # women of 15-45 do; newborns do get perinatal codes.
    pregnancy = [p for p in patients for v in p.visits for c in v if chapter_of(c).index == 10]
    assert pregnancy and all(p.sex == "F" and 12 <= p.age <= 55 for p in pregnancy)
    perinatal = [p for p in patients for v in p.visits for c in v if chapter_of(c).index == 14]
    assert perinatal and all(p.age == 0 for p in perinatal)


def test_clusters_exported_and_recoverable(demo: SimulatedCorpus) -> None:
    payload = json.loads(demo.clusters_to_json())
    assert payload["source"] == "simulated:demo" and payload["seed"] == 0
    assert [c["id"] for c in payload["clusters"]] == list(range(len(demo.clusters)))
    seen: set[str] = set()
    for cluster in demo.clusters:
        assert cluster.codes and not seen & set(cluster.codes)  # disjoint
        seen |= set(cluster.codes)
        assert abs(sum(cluster.weights) - 1) < 1e-9 and cluster.affinity
    # Ground truth holds: a cluster code appears only in patients who carry that cluster.
    owner = {code: c.id for c in demo.clusters for code in c.codes}
    for codes, mine in zip(_patient_codes(demo), demo.patient_clusters):
        assert {owner[c] for c in codes if c in owner} <= set(mine)
    # Within-cluster pairs co-occur far above independence; cross-cluster pairs do not.
    patients = _patient_codes(demo)
    n = len(patients)
    count = Counter(c for codes in patients for c in codes)

    def lift(a: str, b: str) -> float:
        both = sum(1 for codes in patients if a in codes and b in codes)
        return both * n / (count[a] * count[b])

    lifts = [lift(c.codes[0], c.codes[1]) for c in demo.clusters]
    assert min(lifts) > 2.0 and float(np.median(lifts)) > 8.0, lifts
    cross = [lift(a.codes[0], b.codes[0]) for a, b in zip(demo.clusters, demo.clusters[1:])
             if count[a.codes[0]] >= 30 and count[b.codes[0]] >= 30]
    assert cross and float(np.median(cross)) < 2.0, cross


def test_clusters_follow_age_and_sex(demo: SimulatedCorpus) -> None:
    by_name = {c.name: c for c in demo.clusters}
    newborn = by_name["Newborn care"]
    prostate = by_name["Prostate and male genital disorders"]
    patients = demo.corpus.patients
    for patient, mine in zip(patients, demo.patient_clusters):
        if newborn.id in mine:
            assert patient.age == 0
        if patient.age == 0:
            assert all(demo.clusters[k].age_range[0] == 0 for k in mine)
    carriers = [p for p, mine in zip(patients, demo.patient_clusters) if prostate.id in mine]
    assert carriers and all(p.sex == "M" for p in carriers)  # MCE male-only codes


@pytest.mark.parametrize("name", ["demo.csv", "demo.csv.gz", "demo.parquet"])
def test_write_generic_round_trip(demo: SimulatedCorpus, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write_generic(demo.corpus, path)
    loaded = load_generic(path)
    assert loaded.drops.total == 0
    # The file carries the synthetic visit times, which the loaded corpus keeps.
    assert [replace(p, visit_times=None) for p in loaded.patients] == demo.corpus.patients
    for patient in loaded.patients:
        starts = [start for start, _ in patient.visit_times]
        assert starts[0] == 0.0 and starts == sorted(starts)


def test_write_generic_times_and_ages(demo: SimulatedCorpus, tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "demo.csv"
    write_generic(demo.corpus, path)
    frame = pd.read_csv(path, dtype={"code": str, "visit_id": str})
    visits = frame.drop_duplicates("visit_id")
    times = pd.to_datetime(visits["visit_time"])
    assert len(visits) == sum(len(p.visits) for p in demo.corpus.patients)
    for _, group in visits.assign(time=times).groupby("patient_id"):
        assert group["time"].is_monotonic_increasing and group["time"].is_unique
        assert group["age"].is_monotonic_increasing
        assert group["age"].iloc[0] >= 1 or group["age"].max() < 1  # newborns stay age 0


def test_default_clusters_path() -> None:
    assert default_clusters_path(Path("a/demo.csv.gz")) == Path("a/demo.clusters.json")
    assert default_clusters_path(Path("a/demo.parquet")) == Path("a/demo.clusters.json")
    assert default_clusters_path(Path("demo.csv")) == Path("demo.clusters.json")


def test_cli_simulate(demo: SimulatedCorpus, tmp_path: Path) -> None:
    out = tmp_path / "sim" / "demo.csv.gz"
    result = runner.invoke(app, ["data", "simulate", "--preset", "demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "distinct codes" in result.output
    loaded = load_generic(out).patients
    assert [replace(p, visit_times=None) for p in loaded] == demo.corpus.patients
    clusters = json.loads((tmp_path / "sim" / "demo.clusters.json").read_text())
    assert len(clusters["clusters"]) == len(demo.clusters)

    other = tmp_path / "c.json"
    result = runner.invoke(app, ["data", "simulate", "--out", str(tmp_path / "s1.parquet"),
                                 "--seed", "1", "--clusters-out", str(other)])
    assert result.exit_code == 0, result.output
    assert json.loads(other.read_text())["seed"] == 1


def test_cli_simulate_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "simulate", "--preset", "nope", "--out",
                                 str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "unknown preset" in result.output
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = runner.invoke(app, ["data", "simulate", "--out", str(blocker / "x.csv")])
    assert result.exit_code == 2 and "cannot write" in result.output


def test_mimic3_scale() -> None:
    started = time.perf_counter()
    sim = simulate_corpus("mimic3-scale", seed=0)
    seconds = time.perf_counter() - started
    assert seconds < 60, seconds
    stats = corpus_stats(sim.corpus.patients)
    assert stats.patients == 46_520
    assert stats.distinct_codes >= 6_000
    assert 8.5 < stats.mean_codes_per_visit < 9.5
    assert 1.2 < stats.mean_visits_per_patient < 1.4
    assert 0.12 < stats.age_bins["0"] / stats.patients < 0.22  # MIMIC-III-like neonate share
    # Zipf-like: rank-frequency is close to a straight line of slope about -1 on log-log axes.
    freq = np.sort(np.array(list(Counter(
        c for p in sim.corpus.patients for v in p.visits for c in v).values())))[::-1]
    ranks = np.arange(1, freq.size + 1)
    window = slice(9, 3_000)
    slope, intercept = np.polyfit(np.log(ranks[window]), np.log(freq[window]), 1)
    residual = np.log(freq[window]) - (slope * np.log(ranks[window]) + intercept)
    assert -1.8 < slope < -0.6, slope
    assert float(np.sqrt(np.mean(residual ** 2))) < 0.5
