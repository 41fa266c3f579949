"""Ingestion rules of issue 16: dates never guessed, visit times, drops with examples, loads that
keep nothing (or too little) refused, float ICD versions, dotted E-codes, the DE-SynPUF source
and patient lengths; counts are checked against independent pandas counts of the same files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from app.cli import app
from app.corpus import Patient, length_stats, token_length
from training.loaders import DataError, load_corpus
from training.loaders.mimic4 import ICD10_ROW

sys.path.insert(0, str(Path(__file__).parent))
from synpuf_fixture import EXPECTED, EXPECTED_DROPS, write_synpuf

runner = CliRunner()


def _flat(times) -> list[float]:
    return [t for pair in times for t in pair]


def _generic(path: Path, rows: list[tuple], columns=("patient_id", "visit_id", "code", "age",
                                                      "sex", "visit_time")) -> Path:
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


# --- dates ------------------------------------------------------------------------------------

def test_non_iso_dates_stop_loading_with_file_row_column_and_value(tmp_path: Path) -> None:
    path = _generic(tmp_path / "dates.csv", [("a", "1", "4019", 50, "F", "2012-01-15"),
                                             ("a", "2", "25000", 50, "F", "03/15/2012")])
    with pytest.raises(DataError, match=r"dates\.csv data row 2 \(line 3\), column visit_time: "
                                        r"date '03/15/2012' is not ISO 8601.*--date-format"):
        load_corpus("generic", path)


def test_an_impossible_iso_date_is_an_error(tmp_path: Path) -> None:
    path = _generic(tmp_path / "feb.csv", [("a", "1", "4019", 50, "F", "2012-02-30")])
    with pytest.raises(DataError, match=r"data row 1 .*'2012-02-30' is not a valid date"):
        load_corpus("generic", path)


def test_explicit_day_first_format_orders_visits_by_parsed_time_not_text(tmp_path: Path) -> None:
    # By text (and by file order) 02/03 comes first; in time 15 January does.
    path = _generic(tmp_path / "dayfirst.csv", [("a", "2", "25000", 61, "F", "02/03/2012"),
                                                ("a", "1", "4019", 60, "F", "15/01/2012")])
    corpus = load_corpus("generic", path, date_format="%d/%m/%Y")
    (patient,) = corpus.patients
    assert patient.visits == (("4019",), ("25000",))
    assert patient.age == 60  # the age at the first visit in time
    assert patient.visit_times == ((0.0, 0.0), (47.0, 47.0))  # 2012 is a leap year


def test_a_column_mixing_formats_stops_loading(tmp_path: Path) -> None:
    path = _generic(tmp_path / "mixed.csv", [("a", "1", "4019", 60, "F", "15/01/2012"),
                                             ("a", "2", "25000", 60, "F", "2012-03-02")])
    with pytest.raises(DataError, match=r"mixed\.csv data row 2 \(line 3\), column visit_time: "
                                        r"date '2012-03-02' does not match the date format"):
        load_corpus("generic", path, date_format="%d/%m/%Y")


def test_cli_date_format_option(tmp_path: Path) -> None:
    path = _generic(tmp_path / "us.csv", [("a", "1", "4019", 60, "F", "03/15/2012")])
    result = runner.invoke(app, ["data", "stats", "--source", "generic", str(path)])
    assert result.exit_code == 2 and "is not ISO 8601" in " ".join(result.output.split())
    result = runner.invoke(app, ["data", "stats", "--source", "generic", str(path),
                                 "--date-format", "%m/%d/%Y"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "stats", "--source", "uci", str(path),
                                 "--date-format", "%m/%d/%Y"])
    assert result.exit_code == 2 and "no date columns" in result.output


def test_mimic3_visit_times_match_pandas(shared_data: Path) -> None:
    corpus = load_corpus("mimic3", shared_data / "mimic3-demo")
    adm = pd.read_csv(shared_data / "mimic3-demo" / "ADMISSIONS.csv",
                      parse_dates=["admittime", "dischtime"]).sort_values("admittime")
    for patient in corpus.patients:
        rows = adm[adm.subject_id == int(patient.patient_id)]
        origin = rows.admittime.iloc[0]
        expected = tuple(((a - origin).total_seconds() / 86400, (d - origin).total_seconds() / 86400)
                         for a, d in zip(rows.admittime, rows.dischtime))
        assert _flat(patient.visit_times) == pytest.approx(_flat(expected))
        starts = [s for s, _ in patient.visit_times]
        assert starts == sorted(starts) and starts[0] == 0.0


def test_eicu_visit_times_for_single_stay_patients_only(shared_data: Path) -> None:
    corpus = load_corpus("eicu", shared_data / "eicu-demo")
    stays = pd.read_csv(shared_data / "eicu-demo" / "patient.csv.gz")
    n_stays = stays.groupby("uniquepid").patienthealthsystemstayid.nunique()
    length = (stays.hospitaldischargeoffset - stays.hospitaladmitoffset) / 1440
    length_of = dict(zip(stays.uniquepid, length))
    timed = [p for p in corpus.patients if p.visit_times is not None]
    assert len(timed) == sum(n_stays[p.patient_id] == 1 for p in corpus.patients) == 1_344
    for patient in timed:
        assert _flat(patient.visit_times) == pytest.approx([0.0, length_of[patient.patient_id]])


def test_to_dict_adds_visit_times_only_when_known() -> None:
    plain = Patient("p", 50.0, "F", (("4019",),))
    assert plain.to_dict() == {"patient_id": "p", "age": 50.0, "sex": "F", "visits": [["4019"]]}
    timed = Patient("p", 50.0, "F", (("4019",), ("25000",)), ((0.0, 1.5), (30.0, 30.0)))
    assert timed.to_dict()["visit_times"] == [[0.0, 1.5], [30.0, 30.0]]


# --- drops and refused loads --------------------------------------------------------------------

def _people(extra: list[tuple]) -> list[tuple]:
    good = [(f"g{i}", "1", "4019", 40 + i, "F", "2012-01-01") for i in range(6)]
    return good + extra


def test_patient_drops_carry_file_row_column_and_value(tmp_path: Path) -> None:
    path = _generic(tmp_path / "odd.csv", _people([
        ("u", "1", "4019", 40, "U", "2012-01-01"), ("w", "1", "4019", 40, "woman", "2012-01-01"),
        ("e", "1", "4019", None, "F", "2012-01-01"), ("n", "1", "4019", -3, "M", "2012-01-01")]))
    corpus = load_corpus("generic", path)
    assert len(corpus.patients) == 6
    assert corpus.drops.counts["patient with unknown sex"] == 2
    assert corpus.drops.examples["patient with unknown sex"] == [
        "patient u: odd.csv data row 7 (line 8), column sex, value 'U'",
        "patient w: odd.csv data row 8 (line 9), column sex, value 'woman'"]
    assert corpus.drops.counts["patient with missing or negative age"] == 2
    assert corpus.drops.examples["patient with missing or negative age"] == [
        "patient e: odd.csv data row 9 (line 10), column age, value empty",
        "patient n: odd.csv data row 10 (line 11), column age, value '-3.0'"]
    assert corpus.drops.patients_dropped == 4


def test_non_ascii_digits_and_icd10_codes_are_counted_apart(tmp_path: Path) -> None:
    path = _generic(tmp_path / "codes.csv", _people([
        ("x", "1", "\uff14\uff10\uff11\uff19", 40, "F", "2012-01-01"),  # fullwidth 4019
        ("x", "1", "I10", 40, "F", "2012-01-01"), ("x", "1", "E87.82", 40, "F", "2012-01-01")]))
    corpus = load_corpus("generic", path)
    assert corpus.drops.counts["not an ICD-9-CM code"] == 1
    assert corpus.drops.examples["not an ICD-9-CM code"] == [
        "codes.csv data row 7 (line 8), column code, value '\uff14\uff10\uff11\uff19'"]
    icd10 = [r for r in corpus.drops.counts if "ICD-10-CM is not modelled" in r]
    assert len(icd10) == 1 and corpus.drops.counts[icd10[0]] == 1
    assert corpus.patients[-1].visits == (("E8782",),)  # a dot after the third character


def test_a_load_that_keeps_nobody_is_an_error_with_top_reasons(tmp_path: Path) -> None:
    path = _generic(tmp_path / "nobody.csv", [("u", "1", "4019", 40, "U", "2012-01-01"),
                                              ("v", "1", "ABC", 40, "F", "2012-01-01")])
    with pytest.raises(DataError, match=r"nobody\.csv: no patient was kept; top drop reasons: .*"
                                        r"patient with unknown sex: 1 \(e\.g\. patient u: "):
        load_corpus("generic", path)
    result = runner.invoke(app, ["data", "stats", str(path)])
    assert result.exit_code == 2 and "no patient was kept" in result.output


def test_dropping_more_than_the_allowed_share_is_an_error(tmp_path: Path) -> None:
    rows = [("a", "1", "4019", 40, "F", "2012-01-01"), ("b", "1", "4019", 40, "X", "2012-01-01"),
            ("c", "1", "4019", 40, "X", "2012-01-01")]
    path = _generic(tmp_path / "most.csv", rows)
    with pytest.raises(DataError, match=r"2 of 3 patients were dropped \(more than the allowed "
                                        r"50%\)"):
        load_corpus("generic", path)
    assert len(load_corpus("generic", path, max_drop_share=0.7).patients) == 1


# --- MIMIC-IV ---------------------------------------------------------------------------------

def _mimic4(folder: Path, versions, suffix: str = ".csv.gz") -> Path:
    hosp = folder / "hosp"
    hosp.mkdir(parents=True)
    write = ((lambda f, p: f.to_parquet(p, index=False)) if suffix == ".parquet"
             else (lambda f, p: f.to_csv(p, index=False)))
    write(pd.DataFrame({"subject_id": [1, 2], "gender": ["F", "M"], "anchor_age": [60, 30],
                        "anchor_year": [2150, 2140]}), hosp / f"patients{suffix}")
    write(pd.DataFrame({"subject_id": [1, 1, 2], "hadm_id": [11, 12, 21],
                        "admittime": ["2152-01-01 10:00:00", "2151-06-01 00:00:00",
                                      "2140-03-03 00:00:00"],
                        "dischtime": ["2152-01-03 10:00:00", "2151-06-02 12:00:00",
                                      "2140-03-05 00:00:00"]}), hosp / f"admissions{suffix}")
    write(pd.DataFrame({"subject_id": [1, 1, 1, 2, 2], "hadm_id": [11, 12, 12, 21, 21],
                        "icd_code": ["4019", "250.00", "I10", "E87.82", "E11"],
                        "icd_version": versions}), hosp / f"diagnoses_icd{suffix}")
    return folder


@pytest.mark.parametrize(("versions", "suffix"), [
    ([9.0, 9.0, 10.0, 9.0, 10.0], ".parquet"),  # floats, as Parquet writers store them
    (["9", "9.0", "10", "9", "10"], ".csv.gz"),
    ([9, 9, 10, 9, 10], ".csv"),
])
def test_mimic4_reads_9_9point0_and_text_versions(tmp_path: Path, versions, suffix) -> None:
    corpus = load_corpus("mimic4", _mimic4(tmp_path, versions, suffix))
    assert corpus.drops.counts[ICD10_ROW] == 2
    assert "ICD-10-CM is not modelled" in ICD10_ROW
    assert corpus.drops.examples[ICD10_ROW][0].endswith("column icd_code, value 'I10'")
    first, second = corpus.patients
    assert first.visits == (("25000",), ("4019",))
    # 2151-06-01 00:00 -> 2152-01-01 10:00 is 214 days 10 hours
    assert _flat(first.visit_times) == pytest.approx([0.0, 1.5, 214 + 10 / 24, 216 + 10 / 24])
    assert second.visits == (("E8782",),)  # E87.82: the dot after the third character


def test_mimic4_with_no_icd9_row_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no patient was kept.*ICD-10 row"):
        load_corpus("mimic4", _mimic4(tmp_path, [10] * 5))


def test_mimic4_version_that_is_no_number_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data row 3 .*column icd_version: ICD version 'ten'"):
        load_corpus("mimic4", _mimic4(tmp_path, [9, 9, "ten", 9, 10]))


# --- DE-SynPUF --------------------------------------------------------------------------------

def test_synpuf_fixture_loads_as_the_layout_says(tmp_path: Path) -> None:
    folder = write_synpuf(tmp_path / "synpuf")
    corpus = load_corpus("synpuf", folder)
    got = {p.patient_id: (p.sex, p.visits, p.visit_times) for p in corpus.patients}
    assert got == EXPECTED
    assert dict(corpus.drops.counts) == EXPECTED_DROPS
    assert corpus.raw_counts == {"beneficiaries": 5, "inpatient claim rows": 2,
                                 "outpatient claim rows": 3, "carrier claim rows": 5,
                                 "claims": 9}
    # independent pandas count: kept patients' claims (distinct file + CLM_ID), less the one
    # claim whose only code is not ICD-9
    claims = pd.concat(pd.read_csv(p, dtype=str).assign(file=p.name)
                       for p in folder.iterdir() if "Claims" in p.name)
    kept = claims[claims.DESYNPUF_ID.isin(EXPECTED)]
    assert sum(len(p.visits) for p in corpus.patients) == \
        kept.drop_duplicates(["file", "CLM_ID"]).shape[0] - 1
    a = next(p for p in corpus.patients if p.patient_id == "00000A")
    assert a.age == pytest.approx((pd.Timestamp("2008-01-05") - pd.Timestamp("1940-01-15")).days
                                  / 365.2425)
    examples = corpus.drops.examples["patient with unknown sex"]
    assert examples == [("patient 00000C: DE1_0_2008_Beneficiary_Summary_File_Sample_1.csv data "
                        "row 3 (line 4), column bene_sex_ident_cd, value '3'")]


def test_synpuf_cli_and_missing_files(tmp_path: Path) -> None:
    folder = write_synpuf(tmp_path / "synpuf")
    result = runner.invoke(app, ["data", "stats", "--source", "synpuf", str(folder)])
    assert result.exit_code == 0, result.output
    assert "read: beneficiaries" in result.output and "dropped (8 in all" in result.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="needs at least one \\*Beneficiary_Summary_File\\*"):
        load_corpus("synpuf", tmp_path / "empty")


# --- patient lengths --------------------------------------------------------------------------

def test_token_lengths_match_pandas_on_mimic3(shared_data: Path) -> None:
    corpus = load_corpus("mimic3", shared_data / "mimic3-demo")
    dx = pd.read_csv(shared_data / "mimic3-demo" / "DIAGNOSES_ICD.csv", dtype=str)
    per_visit = dx.groupby(["subject_id", "hadm_id"]).icd9_code.nunique() + 2
    expected = (per_visit.groupby(level=0).sum() + 2).sort_values().to_numpy()
    lengths = np.sort([token_length(p) for p in corpus.patients])
    assert lengths.tolist() == expected.tolist()
    stats = length_stats(corpus.patients, max_positions=40)
    assert stats.over_limit == int((expected > 40).sum())
    assert stats.token_percentiles["max"] == int(expected.max()) == 298
    assert stats.token_percentiles["p50"] == int(np.percentile(expected, 50, method="higher"))
    visits = dx.groupby("subject_id").hadm_id.nunique()
    assert stats.visit_percentiles["max"] == int(visits.max())
    assert sum(stats.visit_histogram.values()) == len(corpus.patients)
    assert stats.visit_histogram["1"] == int((visits == 1).sum())


def test_cli_reports_lengths_against_max_positions(shared_data: Path) -> None:
    result = runner.invoke(app, ["data", "stats", "--source", "mimic3",
                                 str(shared_data / "mimic3-demo"), "--max-positions", "40"])
    assert result.exit_code == 0, result.output
    assert "patients longer than 40 tokens" in result.output
    assert "patient length in tokens, p99" in result.output
    assert "visits per patient, max" in result.output


def test_synpuf_reads_in_chunks_and_from_parquet(tmp_path: Path, monkeypatch) -> None:
    from training.loaders import synpuf

    folder = write_synpuf(tmp_path / "synpuf")
    outpatient = next(p for p in folder.iterdir() if "Outpatient" in p.name)
    pd.read_csv(outpatient, dtype=str).to_parquet(folder / "Outpatient_Claims.parquet")
    outpatient.unlink()
    monkeypatch.setattr(synpuf, "CHUNK_ROWS", 2)  # chunk borders split claims and files
    corpus = load_corpus("synpuf", folder)
    assert {p.patient_id: (p.sex, p.visits, p.visit_times) for p in corpus.patients} == EXPECTED
    assert dict(corpus.drops.counts) == EXPECTED_DROPS
    assert "Outpatient_Claims.parquet data row 2, column icd9_dgns_cd_1, value 'OTHER'" in \
        corpus.drops.examples["not an ICD-9-CM code"]
