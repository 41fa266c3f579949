"""Loaders on the real shared data (counts pinned) and on bad input a new user might feed."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from app.cli import app
from app.corpus import corpus_stats
from app.icd9.hierarchy import chapter_of
from training.loaders import DataError, load_corpus
from training.loaders.mimic4 import ICD10_ROW

runner = CliRunner()


def _assert_well_formed(patients) -> None:
    for patient in patients:
        assert patient.sex in ("F", "M")
        assert 0 <= patient.age <= 90
        assert patient.visits
        for visit in patient.visits:
            assert visit and len(set(visit)) == len(visit)
            for code in visit:
                chapter_of(code)  # every code resolves to a chapter


def test_mimic3_demo_counts(shared_data: Path) -> None:
    corpus = load_corpus("mimic3", shared_data / "mimic3-demo")
    assert corpus.raw_counts == {"patients": 100, "admissions": 129, "diagnosis rows": 1_761}
    stats = corpus_stats(corpus.patients)
    assert (stats.patients, stats.visits, stats.codes, stats.distinct_codes) == (100, 129, 1_761,
                                                                                 581)
    assert corpus.drops.total == 0
    _assert_well_formed(corpus.patients)
    assert max(p.age for p in corpus.patients) == 90  # shifted >89 birth dates are capped


def test_mimic3_upper_case_and_gzip_variant(shared_data: Path, tmp_path: Path) -> None:
    for name in ("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD"):
        frame = pd.read_csv(shared_data / "mimic3-demo" / f"{name}.csv", dtype=str)
        frame.columns = [c.upper() for c in frame.columns]
        with gzip.open(tmp_path / f"{name}.csv.gz", "wt") as handle:
            frame.to_csv(handle, index=False)
    upper = load_corpus("mimic3", tmp_path)
    lower = load_corpus("mimic3", shared_data / "mimic3-demo")
    assert upper.patients == lower.patients


def test_mimic3_visits_are_in_time_order(shared_data: Path) -> None:
    admissions = pd.read_csv(shared_data / "mimic3-demo" / "ADMISSIONS.csv",
                             parse_dates=["admittime"])
    diagnoses = pd.read_csv(shared_data / "mimic3-demo" / "DIAGNOSES_ICD.csv", dtype=str)
    corpus = load_corpus("mimic3", shared_data / "mimic3-demo")
    multi = next(p for p in corpus.patients if len(p.visits) > 2)
    ordered = admissions[admissions.subject_id == int(multi.patient_id)].sort_values("admittime")
    first_hadm = str(ordered.hadm_id.iloc[0])
    first_codes = set(diagnoses[diagnoses.hadm_id == first_hadm].icd9_code)
    assert set(multi.visits[0]) == first_codes


def test_uci_counts(shared_data: Path) -> None:
    corpus = load_corpus("uci", shared_data / "uci-diabetes-130")
    assert corpus.raw_counts["patients"] == 71_518
    assert corpus.raw_counts["encounters"] == 101_766
    stats = corpus_stats(corpus.patients)
    assert stats.patients == 71_518 - 3 - 1  # 3 of unknown sex, 1 without any code
    assert stats.distinct_codes == 915
    assert stats.max_codes_per_visit == 3
    assert corpus.drops.counts["patient with unknown sex"] == 3
    assert corpus.drops.counts["missing code"] == 1_802  # '?' in diag_1..3
    # independent pandas counts: the first '?' and the repeated codes within an encounter
    table = pd.read_csv(shared_data / "uci-diabetes-130" / "diabetic_data.csv.gz", dtype=str)
    first_missing = int(table.index[table["diag_1"] == "?"][0]) + 1  # 1-based data row
    assert corpus.drops.examples["missing code"][0] == (
        f"diabetic_data.csv.gz data row {first_missing} (line {first_missing + 1}), column diag_1")
    known = table[["diag_1", "diag_2", "diag_3"]].replace("?", pd.NA)
    repeated = ((known.diag_2 == known.diag_1).fillna(False).sum()
                + ((known.diag_3 == known.diag_1) | (known.diag_3 == known.diag_2))
                .fillna(False).sum())
    assert corpus.drops.counts["duplicate code within a visit"] == repeated == 5_591
    assert all(p.visit_times is None for p in corpus.patients)  # the file has no dates
    _assert_well_formed(corpus.patients)
    codes = {c for p in corpus.patients for v in p.visits for c in v}
    assert "008" in codes and "8" not in codes  # dropped leading zeros restored


def test_eicu_counts(shared_data: Path) -> None:
    corpus = load_corpus("eicu", shared_data / "eicu-demo")
    assert corpus.raw_counts == {"patients": 1_841, "hospital stays": 2_174, "ICU stays": 2_520,
                                 "diagnosis rows": 24_978}
    assert corpus.drops.counts["missing code"] == 3_772
    # every row without an ICD-9 entry holds ICD-10-CM codes only, reported with the hint;
    # independent count: rows whose entries all start with a letter other than V
    dx = pd.read_csv(shared_data / "eicu-demo" / "diagnosis.csv.gz", dtype=str)
    entries = dx["icd9code"].dropna().str.split(",")
    only10 = entries.map(lambda e: all(x.strip()[:1].isalpha() and x.strip()[:1] != "V"
                                       for x in e))
    assert corpus.drops.counts["row with only ICD-10-CM codes (ICD-10-CM is not modelled)"] == \
        int(only10.sum()) == 241
    assert "row without an ICD-9 code" not in corpus.drops.counts
    _assert_well_formed(corpus.patients)
    stats = corpus_stats(corpus.patients)
    assert 400 <= stats.distinct_codes <= 450


def _write_generic(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_generic_csv_and_parquet(tmp_path: Path) -> None:
    rows = [
        {"patient_id": "a", "visit_id": "2", "code": "250.00", "age": 95, "sex": "female",
         "visit_time": "2020-05-01"},
        {"patient_id": "a", "visit_id": "1", "code": "4019", "age": 94, "sex": "female",
         "visit_time": "2019-01-01"},
        {"patient_id": "a", "visit_id": "1", "code": "401.9", "age": 94, "sex": "female",
         "visit_time": "2019-01-01"},
        {"patient_id": "b", "visit_id": "1", "code": "V57", "age": 0.5, "sex": "M",
         "visit_time": "2019-01-01"},
    ]
    csv = load_corpus("generic", _write_generic(tmp_path / "long.csv", rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "long.parquet")
    parquet = load_corpus("generic", tmp_path / "long.parquet")
    assert csv.patients == parquet.patients
    a = csv.patients[0]
    assert a.visits == (("4019",), ("25000",))  # time order; duplicate code removed
    assert csv.drops.counts["duplicate code within a visit"] == 1
    assert csv.drops.examples["duplicate code within a visit"] == [
        "long.csv data row 3 (line 4), column code, value '4019'"]
    assert a.visit_times == ((0.0, 0.0), (486.0, 486.0))  # 2019-01-01 -> 2020-05-01
    assert a.age == 90  # 94 capped
    assert csv.patients[1].visits == (("V57",),)


def test_bad_code_is_counted_with_file_row_and_column(tmp_path: Path) -> None:
    path = _write_generic(tmp_path / "bad.csv", [
        {"patient_id": "a", "visit_id": "1", "code": "ABC", "age": 40, "sex": "F"},
        {"patient_id": "a", "visit_id": "1", "code": "250.00", "age": 40, "sex": "F"},
    ])
    corpus = load_corpus("generic", path)
    assert corpus.drops.counts["not an ICD-9-CM code"] == 1
    assert corpus.drops.examples["not an ICD-9-CM code"] == [
        "bad.csv data row 1 (line 2), column code, value 'ABC'"]
    assert corpus.patients[0].visits == (("25000",),)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "nocol.csv"
    path.write_text("patient_id,visit_id,code\n1,1,4019\n")
    with pytest.raises(DataError, match=r"nocol\.csv: missing column\(s\) age, sex"):
        load_corpus("generic", path)


def test_empty_file_and_missing_table_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        load_corpus("generic", tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("patient_id,visit_id,code,age,sex\n")
    with pytest.raises(DataError, match="no rows"):
        load_corpus("generic", tmp_path / "header.csv")
    with pytest.raises(DataError, match="missing table 'PATIENTS'"):
        load_corpus("mimic3", tmp_path)


def test_unparseable_date_names_row_and_column(shared_data: Path, tmp_path: Path) -> None:
    for name in ("PATIENTS", "DIAGNOSES_ICD"):
        shutil.copy(shared_data / "mimic3-demo" / f"{name}.csv", tmp_path)
    admissions = pd.read_csv(shared_data / "mimic3-demo" / "ADMISSIONS.csv", dtype=str)
    admissions.loc[4, "admittime"] = "not-a-date"
    admissions.to_csv(tmp_path / "ADMISSIONS.csv", index=False)
    with pytest.raises(DataError, match=r"ADMISSIONS\.csv data row 5 \(line 6\), column "
                                        r"admittime: date 'not-a-date' is not ISO 8601"):
        load_corpus("mimic3", tmp_path)


def test_mimic4_keeps_icd9_rows_only(tmp_path: Path) -> None:
    hosp = tmp_path / "hosp"
    hosp.mkdir()
    pd.DataFrame({"subject_id": [1, 2], "gender": ["F", "M"], "anchor_age": [60, 30],
                  "anchor_year": [2150, 2140]}).to_csv(hosp / "patients.csv.gz", index=False)
    pd.DataFrame({"subject_id": [1, 1, 2], "hadm_id": [11, 12, 21],
                  "admittime": ["2152-01-01 10:00:00", "2151-06-01 00:00:00",
                                "2140-03-03 00:00:00"]}).to_csv(hosp / "admissions.csv.gz",
                                                               index=False)
    pd.DataFrame({"subject_id": [1, 1, 1, 2, 2], "hadm_id": [11, 12, 12, 21, 21],
                  "icd_code": ["4019", "250.00", "I10", "V3000", "E11"],
                  "icd_version": [9, 9, 10, 9, 10]}).to_csv(hosp / "diagnoses_icd.csv.gz",
                                                            index=False)
    corpus = load_corpus("mimic4", tmp_path)
    assert corpus.drops.counts[ICD10_ROW] == 2
    first, second = corpus.patients
    assert first.visits == (("25000",), ("4019",))  # 2151 admission precedes 2152
    assert first.age == 61  # anchor_age + 2151 - 2150
    assert second.visits == (("V3000",),) and second.sex == "M"


def test_unknown_source_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown source 'cerner'"):
        load_corpus("cerner", ".")


def test_cli_data_stats_prints_counts_and_drops(shared_data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "stats", "--source", "mimic3",
                                 str(shared_data / "mimic3-demo")])
    assert result.exit_code == 0, result.output
    assert "1,761" in result.output and "129" in result.output
    path = tmp_path / "nocol.csv"
    path.write_text("patient_id,code\n1,4019\n")
    result = runner.invoke(app, ["data", "stats", str(path)])
    assert result.exit_code == 2
    assert "missing column(s) visit_id, age, sex" in result.output


def test_cli_data_stats_on_a_preset() -> None:
    result = runner.invoke(app, ["data", "stats", "--preset", "demo"])
    assert result.exit_code == 0, result.output
    assert "2,000" in result.output and "distinct codes" in result.output
    result = runner.invoke(app, ["data", "stats", "--preset", "nope"])
    assert result.exit_code == 2 and "unknown preset 'nope'" in result.output
    result = runner.invoke(app, ["data", "stats"])
    assert result.exit_code == 2 and "give a PATH" in result.output
