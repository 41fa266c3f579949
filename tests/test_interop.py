"""Interoperability: dated visits, the OMOP CDM 5.4, FHIR R4 and Parquet result formats, the
Athena concept map and ``synthehr generate`` (over the real engine and a tiny real bundle)."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from test_service_support import ROOT, session_generator, tiny_bundle, wait_for

from app.athena import AthenaError, load_athena
from app.corpus import Patient
from app.dating import DEFAULT_INTERVALS, Dater, interval_stats
from app.service.api import create_app
from app.service.cohort_file import write_cohort
from app.service.schemas import CohortSpec
from app.service.store import EmbeddedStore
from app.settings import Settings

ATHENA = Path(__file__).parent / "data" / "athena"
FMT = "%Y-%m-%d %H:%M:%S"

# OMOP CDM v5.4 column lists, in the CDM's order, copied from the OHDSI CommonDataModel
# specification (inst/csv/OMOP_CDMv5.4_Field_Level.csv) independently of app/.
CDM54 = {
    "person": ["person_id", "gender_concept_id", "year_of_birth", "month_of_birth",
               "day_of_birth", "birth_datetime", "race_concept_id", "ethnicity_concept_id",
               "location_id", "provider_id", "care_site_id", "person_source_value",
               "gender_source_value", "gender_source_concept_id", "race_source_value",
               "race_source_concept_id", "ethnicity_source_value",
               "ethnicity_source_concept_id"],
    "observation_period": ["observation_period_id", "person_id",
                           "observation_period_start_date", "observation_period_end_date",
                           "period_type_concept_id"],
    "visit_occurrence": ["visit_occurrence_id", "person_id", "visit_concept_id",
                         "visit_start_date", "visit_start_datetime", "visit_end_date",
                         "visit_end_datetime", "visit_type_concept_id", "provider_id",
                         "care_site_id", "visit_source_value", "visit_source_concept_id",
                         "admitted_from_concept_id", "admitted_from_source_value",
                         "discharged_to_concept_id", "discharged_to_source_value",
                         "preceding_visit_occurrence_id"],
    "condition_occurrence": ["condition_occurrence_id", "person_id", "condition_concept_id",
                             "condition_start_date", "condition_start_datetime",
                             "condition_end_date", "condition_end_datetime",
                             "condition_type_concept_id", "condition_status_concept_id",
                             "stop_reason", "provider_id", "visit_occurrence_id",
                             "visit_detail_id", "condition_source_value",
                             "condition_source_concept_id", "condition_status_source_value"],
}
# CDM required (NOT NULL) integer columns that must parse as integers in every row.
CDM54_REQUIRED_INT = {
    "person": ["person_id", "gender_concept_id", "year_of_birth", "race_concept_id",
               "ethnicity_concept_id"],
    "observation_period": ["observation_period_id", "person_id", "period_type_concept_id"],
    "visit_occurrence": ["visit_occurrence_id", "person_id", "visit_concept_id",
                         "visit_type_concept_id"],
    "condition_occurrence": ["condition_occurrence_id", "person_id", "condition_concept_id",
                             "condition_type_concept_id"],
}
CDM54_REQUIRED_DATE = {
    "observation_period": ["observation_period_start_date", "observation_period_end_date"],
    "visit_occurrence": ["visit_start_date", "visit_end_date"],
    "condition_occurrence": ["condition_start_date"],
}


@pytest.fixture(scope="module")
def gen():
    return session_generator()


class _WithIntervals:
    """A generator whose bundle statistics carry the given visit intervals."""

    def __init__(self, inner, intervals) -> None:
        self._inner, self.visit_intervals = inner, intervals

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _timed(pid: str, times) -> Patient:
    return Patient(pid, 50.0, "F", tuple(("4019",) for _ in times), tuple(times))


# -- dated visits ---------------------------------------------------------------------------------

def test_interval_stats_follow_the_source_and_default_without_times():
    patients = [_timed(f"p{i}", [(0.0, 2.0 + i % 5), (30.0 + i, 33.0 + i), (200.0, 207.0)])
                for i in range(40)]
    patients.append(Patient("untimed", 60.0, "M", (("4019",),)))
    stats = interval_stats(patients)
    assert stats["source"] == "training split" and stats["n_patients"] == 40
    assert stats["n_stays"] == 120 and stats["n_gaps"] == 80
    stays = [e - s for p in patients[:40] for s, e in p.visit_times]
    assert stats["stay_days"][10] == pytest.approx(float(np.median(stays)), abs=1e-4)
    assert min(stays) <= stats["stay_days"][0] <= stats["stay_days"][-1] <= max(stays)
    assert interval_stats([Patient("u", 1.0, "F", (("4019",),))]) == DEFAULT_INTERVALS
    # Single-visit patients have stays but no gaps: the default gap table is kept.
    single = interval_stats([_timed("s", [(0.0, 4.0)])])
    dater = Dater(single, "x")
    dates = dater.date(1, 30.0, 3)
    gap_days = [(b[0] - a[1]).total_seconds() / 86400 for a, b in zip(dates.visits,
                                                                      dates.visits[1:])]
    assert all(14 <= g <= 714 for g in gap_days)


def test_bundle_reference_stats_carry_the_intervals():
    from app.bundle import reference_stats
    from app.vocab import Vocabulary

    timed = [_timed(f"p{i}", [(0.0, 3.0), (10.0, 12.0 + i)]) for i in range(20)]
    stats = reference_stats(timed, Vocabulary.from_patients(timed))["visit_intervals"]
    assert stats == interval_stats(timed) and stats["source"] == "training split"
    json.dumps(stats)  # stored as JSON in the bundle
    untimed = [Patient("u", 50.0, "F", (("4019",),))]
    assert reference_stats(untimed, Vocabulary.from_patients(untimed))["visit_intervals"] \
        == DEFAULT_INTERVALS


def test_dater_is_seeded_ordered_and_consistent_with_age():
    stats = interval_stats([_timed(f"p{i}", [(0.0, 1.0 + i % 3), (10.0 + i, 12.0 + i)])
                            for i in range(50)])
    a, b, other = Dater(stats, "job-a"), Dater(stats, "job-a"), Dater(stats, "job-b")
    for n in range(1, 200):
        age = (n * 7) % 91 + 0.3
        d = a.date(n, age, 1 + n % 5)
        assert d == b.date(n, age, 1 + n % 5)  # deterministic for a result and patient
        assert d != other.date(n, age, 1 + n % 5)  # another result dates differently
        first = d.visits[0][0]
        assert datetime(2100, 1, 1) <= first < datetime(2200, 1, 1)
        assert abs((first - d.birth).days / 365.2425 - age) < 1 / 365  # birth year from age
        for (start, end), nxt in zip(d.visits, [*d.visits[1:], None]):
            assert start <= end and (nxt is None or end <= nxt[0])
            stay = (end - start).total_seconds() / 86400
            assert stats["stay_days"][0] - 1e-3 <= stay <= stats["stay_days"][-1] + 1e-3
    with pytest.raises(ValueError, match="stay_days"):
        Dater({"probs": [0, 1], "stay_days": [5, 1], "gap_days": [1, 2]}, "x")


# -- the Athena concept map -------------------------------------------------------------------------

def test_athena_fixture_maps_icd9_to_source_and_standard_concepts():
    concepts = load_athena(ATHENA)
    assert concepts.source == {"25000": 1000001, "4019": 1000002, "V5861": 1000003,
                               "4280": 1000004}  # 272.4 is deprecated; E21 is ICD-10-CM
    assert concepts.standard == {"25000": 2000001, "4019": 2000002, "V5861": 2000003,
                                 "4280": 2000004}  # lowest of two targets; 'D' link ignored
    assert concepts.source_id("27240") == 0 and concepts.standard_id("2724") == 0


def test_athena_folder_missing_a_file_or_column_is_named(tmp_path, gen):
    (tmp_path / "CONCEPT.csv").write_text((ATHENA / "CONCEPT.csv").read_text())
    with pytest.raises(AthenaError, match="CONCEPT_RELATIONSHIP.csv is missing"):
        load_athena(tmp_path)
    (tmp_path / "CONCEPT_RELATIONSHIP.csv").write_text(
        "concept_id_1\tconcept_id_2\tvalid_start_date\n1\t2\t19700101\n")
    with pytest.raises(AthenaError, match="CONCEPT_RELATIONSHIP.csv has no column "
                                          "relationship_id, invalid_reason"):
        load_athena(tmp_path)
    # The service refuses to start with it, naming the file.
    with pytest.raises(AthenaError, match="relationship_id"):
        create_app(Settings(redis_url=None, athena_vocabulary=tmp_path), generator=gen,
                   store=EmbeddedStore())


# -- every format from one cohort ---------------------------------------------------------------

# Every patient carries a code the Athena fixture knows (any_of), so the OMOP test sees concept
# ids filled whatever the test bundle samples; it also runs targeting through every export.
SPEC = {"size": 60, "age": {"min": 20, "max": 85}, "female_fraction": 0.5, "seed": 11,
        "any_of": ["250.00", "401.9", "428.0", "V58.61"]}


@pytest.fixture(scope="module")
def cohort(gen):
    """A done cohort job in a service with the Athena fixture; its id and its downloads."""
    settings = Settings(redis_url=None, chunk_size=25, athena_vocabulary=ATHENA)
    with TestClient(create_app(settings, generator=gen, store=EmbeddedStore())) as client:
        job = client.post("/v1/cohorts", json=SPEC).json()["id"]
        wait_for(lambda: client.get(f"/v1/cohorts/{job}").json()["status"] == "done", 60,
                 0.05, "cohort")
        downloads = {}
        for fmt in ("ndjson", "mimic3", "omop", "fhir", "parquet", "csv"):
            r = client.get(f"/v1/cohorts/{job}/result?format={fmt}")
            assert r.status_code == 200, r.text
            downloads[fmt] = r
        bad = client.get(f"/v1/cohorts/{job}/result?format=xlsx")
        openapi = client.get("/openapi.json").json()
        yield {"id": job, "downloads": downloads, "bad": bad, "openapi": openapi,
               "patients": [json.loads(x) for x in downloads["ndjson"].text.splitlines()]}


def _omop_tables(content: bytes) -> dict[str, pd.DataFrame]:
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        assert sorted(zf.namelist()) == sorted(f"{t}.csv" for t in CDM54)
        return {t: pd.read_csv(zf.open(f"{t}.csv"), dtype=str, keep_default_na=False)
                for t in CDM54}


def test_omop_tables_follow_cdm54_and_join(cohort):
    r = cohort["downloads"]["omop"]
    assert r.headers["content-type"] == "application/zip"
    tables = _omop_tables(r.content)
    patients = cohort["patients"]
    for name, frame in tables.items():
        assert list(frame.columns) == CDM54[name], name
        for column in CDM54_REQUIRED_INT[name]:
            assert frame[column].str.fullmatch(r"-?\d+").all(), (name, column)
        for column in CDM54_REQUIRED_DATE.get(name, []):
            assert frame[column].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all(), (name, column)
    person, visits, conditions = (tables["person"], tables["visit_occurrence"],
                                  tables["condition_occurrence"])
    assert len(person) == 60 and person["person_id"].is_unique
    assert set(person["gender_concept_id"]) <= {"8532", "8507"}
    # person -> visit -> condition joins with no orphan, and matches the JSON result.
    joined = conditions.merge(visits, on=["visit_occurrence_id", "person_id"], how="left",
                              validate="many_to_one", indicator=True).merge(
        person, on="person_id", how="left", validate="many_to_one")
    assert (joined["_merge"] == "both").all() and joined["gender_concept_id"].notna().all()
    assert len(visits) == sum(len(p["visits"]) for p in patients)
    assert len(conditions) == sum(len(v["codes"]) for p in patients for v in p["visits"])
    by_number = {int(p["patient_id"].rsplit("-", 1)[1]): p for p in patients}
    for pid, group in joined.groupby("person_id", sort=False):
        src = by_number[int(pid)]
        assert group["person_source_value"].iloc[0] == src["patient_id"]
        assert int(group["year_of_birth"].iloc[0]) == int(src["birth_date"][:4])
        assert sorted(group["condition_source_value"]) == sorted(
            c["code"] for v in src["visits"] for c in v["codes"])
        starts = sorted(set(group["visit_start_datetime"]))
        assert starts == sorted(v["start"] for v in src["visits"])
    # Concepts from the Athena fixture where it knows the code, 0 otherwise.
    concepts = load_athena(ATHENA)
    for _, row in conditions.iterrows():
        code = row["condition_source_value"]
        assert int(row["condition_source_concept_id"]) == concepts.source_id(code)
        assert int(row["condition_concept_id"]) == concepts.standard_id(code)
    assert (conditions["condition_source_concept_id"] != "0").any(), "no fixture code hit"
    periods = tables["observation_period"].set_index("person_id")
    for pid, group in visits.groupby("person_id"):
        assert periods.loc[pid, "observation_period_start_date"] == min(group["visit_start_date"])
        assert periods.loc[pid, "observation_period_end_date"] == max(group["visit_end_date"])


def test_fhir_bundles_validate_with_fhir_resources(cohort):
    from fhir.resources.R4B.bundle import Bundle

    r = cohort["downloads"]["fhir"]
    assert r.headers["content-type"].startswith("application/fhir+ndjson")
    lines = r.text.splitlines()
    assert len(lines) == 60
    for line, src in zip(lines, cohort["patients"], strict=True):
        bundle = Bundle.model_validate_json(line)  # every entry's resource is validated too
        assert bundle.type == "collection"
        kinds = [e.resource.get_resource_type() for e in bundle.entry]
        assert kinds[0] == "Patient" and kinds.count("Encounter") == len(src["visits"])
        assert kinds.count("Condition") == sum(len(v["codes"]) for v in src["visits"])
        patient = bundle.entry[0].resource
        assert str(patient.birthDate) == src["birth_date"]
        assert patient.gender == {"F": "female", "M": "male"}[src["sex"]]
        urls = {e.fullUrl for e in bundle.entry}
        assert len(urls) == len(bundle.entry)
        conditions = [e.resource for e in bundle.entry if e.resource.get_resource_type()
                      == "Condition"]
        details = {c["code"]: c for v in src["visits"] for c in v["codes"]}
        for condition in conditions:
            coding = condition.code.coding[0]
            assert coding.system == "http://hl7.org/fhir/sid/icd-9-cm"
            undotted = coding.code.replace(".", "")
            assert coding.display == details[undotted]["description"]
            assert condition.subject.reference in urls and condition.encounter.reference in urls


def test_parquet_schema_and_rows(cohort):
    r = cohort["downloads"]["parquet"]
    table = pq.read_table(io.BytesIO(r.content))
    expected = pa.schema([
        ("patient_id", pa.string()), ("person_number", pa.int64()), ("age", pa.float64()),
        ("sex", pa.string()), ("birth_date", pa.date32()), ("visit_id", pa.string()),
        ("visit_seq", pa.int32()), ("visit_start", pa.timestamp("ms")),
        ("visit_end", pa.timestamp("ms")), ("code", pa.string()), ("category", pa.string()),
        ("chapter", pa.string()), ("description", pa.string())])
    assert table.schema.remove_metadata() == expected
    patients = cohort["patients"]
    assert table.num_rows == sum(len(v["codes"]) for p in patients for v in p["visits"])
    first = table.slice(0, 1).to_pylist()[0]
    src = patients[0]
    assert first["patient_id"] == src["patient_id"] and first["code"] == \
        src["visits"][0]["codes"][0]["code"]
    assert first["visit_start"].strftime(FMT) == src["visits"][0]["start"]


def test_every_format_carries_the_same_dates(cohort, tmp_path):
    from training.loaders.mimic3 import load_mimic3

    patients = cohort["patients"]
    for p in patients:
        assert p["birth_date"] and all(v["start"] <= v["end"] for v in p["visits"])
        starts = [v["start"] for v in p["visits"]]
        assert starts == sorted(starts)
    with zipfile.ZipFile(io.BytesIO(cohort["downloads"]["mimic3"].content)) as zf:
        zf.extractall(tmp_path)
        admissions = pd.read_csv(tmp_path / "ADMISSIONS.csv", dtype=str)
    expected = [(v["start"], v["end"]) for p in patients for v in p["visits"]]
    assert list(zip(admissions["ADMITTIME"], admissions["DISCHTIME"], strict=True)) == expected
    corpus = load_mimic3(tmp_path)  # ages read back from DOB and ADMITTIME
    by_id = {int(p["patient_id"].rsplit("-", 1)[1]): p for p in patients}
    assert all(abs(p.age - by_id[int(p.patient_id)]["age"]) < 0.01 for p in corpus.patients)
    csv_rows = pd.read_csv(io.StringIO(cohort["downloads"]["csv"].text), dtype=str)
    assert list(csv_rows["visit_time"].drop_duplicates()) == [s for s, _ in expected]


def test_unknown_format_422_lists_formats_and_openapi_lists_media_types(cohort):
    bad = cohort["bad"]
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "format"
    for fmt in ("omop", "fhir", "parquet", "mimic3"):
        assert fmt in bad.text
    op = cohort["openapi"]["paths"]["/v1/cohorts/{job_id}/result"]["get"]
    content = op["responses"]["200"]["content"]
    assert {"application/zip", "application/fhir+ndjson", "application/vnd.apache.parquet",
            "application/json", "application/x-ndjson", "text/csv"} <= set(content)
    examples = {name for media in content.values() for name in media["examples"]}
    assert examples == {"json", "ndjson", "csv", "mimic3", "omop", "fhir", "parquet"}


# -- synthehr generate ----------------------------------------------------------------------------

def test_cohort_file_equals_the_service_result(gen, cohort, tmp_path):
    spec = CohortSpec.model_validate(SPEC)
    concepts = load_athena(ATHENA)
    for fmt in ("omop", "fhir"):
        out = write_cohort(gen, spec, fmt, tmp_path / f"c.{fmt}", chunk_size=25, batch=64,
                           concepts=concepts)
        assert out.patients == 60 and out.job_id == cohort["id"]
        assert out.path.read_bytes() == cohort["downloads"][fmt].content, fmt
    assert not list(tmp_path.glob("*.part"))


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """The repository's Python on ``args`` in a clean environment (the exit code is checked by
    the caller)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                               "SYNTHEHR_JSON_LOGS": "false", "COLUMNS": "200"})


def test_generate_cli_writes_without_service_or_training(tmp_path):
    bundle = tiny_bundle()
    if bundle is None:
        pytest.skip("no ONNX bundle could be built here (the CLI needs a bundle folder)")
    out = tmp_path / "cohort.parquet"
    probe = (
        "import sys\n"
        "from app.cli import app\n"
        "try:\n"
        f"    app(['generate', '--bundle', {str(bundle)!r}, '--size', '30', '--age', '40-80',"
        f" '--format', 'parquet', '--out', {str(out)!r}, '--seed', '3'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "bad = sorted(m for m in sys.modules if m == 'training' or m.startswith('training.')"
        " or m == 'torch')\n"
        "assert not bad, bad\n")
    done = _run(["-c", probe])
    assert done.returncode == 0, done.stderr
    assert "wrote 30 patients" in done.stdout
    assert pq.read_table(out).column("person_number").to_pylist()[0] == 1
    bad = _run(["-m", "app.cli", "generate", "--bundle", str(bundle), "--format", "xlsx",
                "--out", str(tmp_path / "x")])
    assert bad.returncode == 2 and "omop, fhir" in bad.stderr
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"size": 5, "female_fraction": 3}))
    bad = _run(["-m", "app.cli", "generate", "--bundle", str(bundle), "--spec", str(spec),
                "--out", str(tmp_path / "x")])
    assert bad.returncode == 2 and "female_fraction" in bad.stderr and str(spec) in bad.stderr


def test_exports_use_the_bundle_intervals(gen, tmp_path):
    from app.runtime.generators import BundleGenerator

    if isinstance(gen, BundleGenerator):  # the demo simulation has no visit times
        assert gen.visit_intervals == DEFAULT_INTERVALS
        assert gen.bundle.reference_stats["visit_intervals"] == DEFAULT_INTERVALS
    stats = interval_stats([_timed(f"p{i}", [(0.0, 0.5), (3.0, 3.5)]) for i in range(10)])
    spec = CohortSpec.model_validate({**SPEC, "size": 8})
    out = write_cohort(_WithIntervals(gen, stats), spec, "ndjson", tmp_path / "c.ndjson")
    for line in out.path.read_text().splitlines():
        visits = [(datetime.strptime(v["start"], FMT), datetime.strptime(v["end"], FMT))
                  for v in json.loads(line)["visits"]]
        for start, end in visits:
            assert (end - start).total_seconds() == pytest.approx(0.5 * 86400, abs=60)
        for a, b in itertools.pairwise(visits):
            assert (b[0] - a[1]).total_seconds() == pytest.approx(2.5 * 86400, abs=60)
