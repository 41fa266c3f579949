"""Result formats, written as byte streams (a cohort is never held whole in memory as text).

Rows come from :func:`app.service.jobs.iter_result`: ``{"id", "n", "age", "sex", "visits"}``.

* ``json``   - one object: ``{"id", "bundle_version", "count", "patients": [...]}``;
* ``ndjson`` - one patient object a line;
  (patients in both carry a ``birth_date``, each visit its ``start`` and ``end`` and each code
  its category, chapter and description, as ``POST /v1/patients`` does)
* ``csv``    - the long format of the project's ``generic`` loader, one row per code:
  ``patient_id, visit_id, visit_seq, code, age, sex, category, chapter, description,
  visit_time, visit_end, birth_date``;
* ``mimic3`` - a zip of ``PATIENTS.csv``, ``ADMISSIONS.csv`` and ``DIAGNOSES_ICD.csv`` in the
  MIMIC-III v1.4 schema: synthetic ``SUBJECT_ID``/``HADM_ID``/``ROW_ID`` and dates shifted into
  2100-2200 as MIMIC's are, so that a pipeline written for MIMIC-III reads it unchanged;
* ``omop``   - a zip of OMOP CDM 5.4 tables (:mod:`app.service.export_omop`);
* ``fhir``   - FHIR R4 NDJSON, one ``Bundle`` per patient (:mod:`app.service.export_fhir`);
* ``parquet`` - the long format as typed Parquet (:mod:`app.service.export_parquet`).

Every format dates visits the same way (:mod:`app.dating`, through :class:`ExportContext`): the
same result and seed give the same birth and visit dates in every format.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

from app.athena import ConceptMap
from app.dating import Dater, PatientDates
from app.icd9.codes import InvalidCodeError
from app.icd9.hierarchy import load_hierarchy

__all__ = ["EXTENSIONS", "FORMATS", "MEDIA_TYPES", "ExportContext", "code_detail",
           "patient_out", "stream"]

FORMATS = ("json", "ndjson", "csv", "mimic3", "omop", "fhir", "parquet")
MEDIA_TYPES = {"json": "application/json", "ndjson": "application/x-ndjson",
               "csv": "text/csv; charset=utf-8", "mimic3": "application/zip",
               "omop": "application/zip", "fhir": "application/fhir+ndjson",
               "parquet": "application/vnd.apache.parquet"}
EXTENSIONS = {"json": "json", "ndjson": "ndjson", "csv": "csv", "mimic3": "zip",
              "omop": "omop.zip", "fhir": "fhir.ndjson", "parquet": "parquet"}
FORMAT_HELP = {
    "json": "one JSON object with every patient",
    "ndjson": "one patient object a line",
    "csv": "the long format, one row per code",
    "mimic3": "zip of MIMIC-III PATIENTS, ADMISSIONS, DIAGNOSES_ICD",
    "omop": "zip of OMOP CDM 5.4 person, observation_period, visit_occurrence, "
            "condition_occurrence",
    "fhir": "FHIR R4 NDJSON, one Bundle (collection) per patient",
    "parquet": "the long format as typed Parquet"}
FLUSH_BYTES = 1 << 16
DATE = "%Y-%m-%d"
Format = Literal["json", "ndjson", "csv", "mimic3", "omop", "fhir", "parquet"]
# What /docs shows for each format (abridged first bytes of a real result).
_EXAMPLES = {
    "json": '{"id":"0f3c...","bundle_version":"demo-1a2b3c4d5e6f","count":1,"patients":[{'
            '"patient_id":"syn-0f3c2a9b-000001","age":67.0,"sex":"F","birth_date":"2101-03-02",'
            '"visits":[{"start":"2168-05-01 10:12:00","end":"2168-05-06 08:00:00","codes":[{'
            '"code":"4019","category":"401","chapter":"390-459","chapter_title":"...",'
            '"description":"Unspecified essential hypertension"}]}]}]}',
    "ndjson": '{"patient_id":"syn-0f3c2a9b-000001","age":67.0,"sex":"F",'
              '"birth_date":"2101-03-02","visits":[...]}',
    "csv": "patient_id,visit_id,visit_seq,code,age,sex,category,chapter,description,"
           "visit_time,visit_end,birth_date\nsyn-0f3c2a9b-000001,syn-0f3c2a9b-000001-v1,1,"
           "4019,67.0,F,401,390-459,Unspecified essential hypertension,2168-05-01 10:12:00,"
           "2168-05-06 08:00:00,2101-03-02",
    "mimic3": "(zip) PATIENTS.csv, ADMISSIONS.csv, DIAGNOSES_ICD.csv",
    "omop": "(zip) person.csv, observation_period.csv, visit_occurrence.csv, "
            "condition_occurrence.csv",
    "fhir": '{"resourceType":"Bundle","type":"collection","entry":[{"resource":{'
            '"resourceType":"Patient",...}},{"resource":{"resourceType":"Encounter",...}},'
            '{"resource":{"resourceType":"Condition","code":{"coding":[{'
            '"system":"http://hl7.org/fhir/sid/icd-9-cm","code":"401.9",'
            '"display":"Unspecified essential hypertension"}]},...}}]}',
    "parquet": "(binary) columns patient_id, person_number, age, sex, birth_date, visit_id, "
               "visit_seq, visit_start, visit_end, code, category, chapter, description",
}


def format_description() -> str:
    """The ``format`` query parameter's description: every format with what it holds."""
    return "; ".join(f"`{f}` ({FORMAT_HELP[f]}, {MEDIA_TYPES[f]})" for f in FORMATS) + "."


def openapi_content() -> dict[str, dict]:
    """The result's OpenAPI ``content``: each media type with an example per format."""
    content: dict[str, dict] = {}
    for fmt in FORMATS:
        media = MEDIA_TYPES[fmt].split(";")[0]
        content.setdefault(media, {"examples": {}})["examples"][fmt] = {
            "summary": f"format={fmt}: {FORMAT_HELP[fmt]}", "value": _EXAMPLES[fmt]}
    return content


@dataclass(frozen=True)
class ExportContext:
    """What every format needs beyond the rows: the dating scheme of this result (its salt is
    the result's identity) and, for OMOP, the deployment's Athena concept map (or None)."""

    dater: Dater
    concepts: ConceptMap | None = None

    @classmethod
    def for_result(cls, salt: str, intervals: dict[str, Any] | None = None,
                   concepts: ConceptMap | None = None) -> ExportContext:
        return cls(Dater(intervals, salt), concepts)

    def dates(self, row: dict) -> PatientDates:
        return self.dater.date(int(row["n"]), float(row["age"]), len(row["visits"]))


@lru_cache(maxsize=65_536)
def code_detail(code: str) -> dict:
    """``{code, category, chapter, chapter_title, description}`` of a canonical code."""
    try:
        info = load_hierarchy().lookup(code)
    except InvalidCodeError:
        return {"code": code, "category": code[:3], "chapter": "", "chapter_title": "",
                "description": None}
    return {"code": info.code, "category": info.category, "chapter": info.chapter.key,
            "chapter_title": info.chapter.title,
            "description": info.description or info.category_description}


def _iso(moment: datetime) -> str:
    return moment.strftime(FMT)


def patient_out(row: dict, dates: PatientDates | None = None) -> dict:
    """A patient as the JSON formats and ``POST /v1/patients`` write it (dates where given)."""
    if dates is None:
        return {"patient_id": row["id"], "age": row["age"], "sex": row["sex"],
                "visits": [{"codes": [code_detail(c) for c in visit]}
                           for visit in row["visits"]]}
    return {"patient_id": row["id"], "age": row["age"], "sex": row["sex"],
            "birth_date": dates.birth.strftime(DATE),
            "visits": [{"start": _iso(start), "end": _iso(end),
                        "codes": [code_detail(c) for c in visit]}
                       for visit, (start, end) in zip(row["visits"], dates.visits,
                                                      strict=True)]}


def _json(rows: Iterable[dict], meta: dict, context: ExportContext) -> Iterator[bytes]:
    head = json.dumps(meta, separators=(",", ":"))[:-1]
    buf = [head.encode(), b',"patients":[']
    size = 0
    for i, row in enumerate(rows):
        out = patient_out(row, context.dates(row))
        part = (b"," if i else b"") + json.dumps(out, separators=(",", ":")).encode()
        buf.append(part)
        size += len(part)
        if size >= FLUSH_BYTES:
            yield b"".join(buf)
            buf, size = [], 0
    buf.append(b"]}\n")
    yield b"".join(buf)


def ndjson_lines(objects: Iterable[dict]) -> Iterator[bytes]:
    """One compact JSON object a line, flushed in blocks of about ``FLUSH_BYTES``."""
    buf: list[bytes] = []
    size = 0
    for obj in objects:
        part = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        buf.append(part)
        size += len(part)
        if size >= FLUSH_BYTES:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


def _ndjson(rows: Iterable[dict], context: ExportContext) -> Iterator[bytes]:
    return ndjson_lines(patient_out(row, context.dates(row)) for row in rows)


class _Sink:
    """A write-only text buffer drained by the generator that owns it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes | str) -> int:
        if isinstance(data, str):
            data = data.encode()
        self.parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = b"".join(self.parts)
        self.parts, self.size = [], 0
        return out


CSV_HEADER = ["patient_id", "visit_id", "visit_seq", "code", "age", "sex", "category",
              "chapter", "description", "visit_time", "visit_end", "birth_date"]


def _csv(rows: Iterable[dict], context: ExportContext) -> Iterator[bytes]:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        dates = context.dates(row)
        birth = dates.birth.strftime(DATE)
        for seq, visit in enumerate(row["visits"], start=1):
            start, end = _iso(dates.visits[seq - 1][0]), _iso(dates.visits[seq - 1][1])
            for code in visit:
                d = code_detail(code)
                writer.writerow([row["id"], f"{row['id']}-v{seq}", seq, code, row["age"],
                                 row["sex"], d["category"], d["chapter"],
                                 d["description"] or "", start, end, birth])
        if text.tell() >= FLUSH_BYTES:
            yield text.getvalue().encode()
            text.seek(0)
            text.truncate()
    yield text.getvalue().encode()


# -- MIMIC-III --------------------------------------------------------------------------------

PATIENTS_HEADER = ["ROW_ID", "SUBJECT_ID", "GENDER", "DOB", "DOD", "DOD_HOSP", "DOD_SSN",
                   "EXPIRE_FLAG"]
ADMISSIONS_HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "ADMITTIME", "DISCHTIME", "DEATHTIME",
                     "ADMISSION_TYPE", "ADMISSION_LOCATION", "DISCHARGE_LOCATION", "INSURANCE",
                     "LANGUAGE", "RELIGION", "MARITAL_STATUS", "ETHNICITY", "EDREGTIME",
                     "EDOUTTIME", "DIAGNOSIS", "HOSPITAL_EXPIRE_FLAG", "HAS_CHARTEVENTS_DATA"]
DIAGNOSES_HEADER = ["ROW_ID", "SUBJECT_ID", "HADM_ID", "SEQ_NUM", "ICD9_CODE"]
HADM_BASE = 100_000
FMT = "%Y-%m-%d %H:%M:%S"


def _zip_csv(zf: zipfile.ZipFile, sink: _Sink, name: str, header: list[str] | tuple[str, ...],
             rows: Iterable[list]) -> Iterator[bytes]:
    """Write one CSV member of ``zf``, yielding the compressed bytes as they pile up."""
    with zf.open(name, "w", force_zip64=True) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            if sink.size >= FLUSH_BYTES:
                text.flush()
                yield sink.drain()
        text.flush()
        text.detach()
    yield sink.drain()


def _patients_rows(rows: Iterable[dict], context: ExportContext) -> Iterator[list]:
    for row in rows:
        n = int(row["n"])
        yield [n, n, row["sex"], context.dates(row).birth.strftime(FMT), "", "", "", 0]


def _admissions_rows(rows: Iterable[dict], context: ExportContext) -> Iterator[list]:
    hadm = HADM_BASE
    for row in rows:
        n = int(row["n"])
        for admit, discharge in context.dates(row).visits:
            hadm += 1
            yield [hadm - HADM_BASE, n, hadm, admit.strftime(FMT), discharge.strftime(FMT), "",
                   "EMERGENCY", "EMERGENCY ROOM ADMIT", "HOME", "Other", "", "", "",
                   "UNKNOWN/NOT SPECIFIED", "", "", "SYNTHETIC", 0, 1]


def _diagnoses_rows(rows: Iterable[dict]) -> Iterator[list]:
    hadm, row_id = HADM_BASE, 0
    for row in rows:
        n = int(row["n"])
        for visit in row["visits"]:
            hadm += 1
            for seq, code in enumerate(visit, start=1):
                row_id += 1
                yield [row_id, n, hadm, seq, code]


def _mimic3_files(rows_factory: Callable[[], Iterable[dict]],
                  context: ExportContext) -> Iterator[bytes]:
    """The MIMIC-III zip: three passes over the patients, one per table (admission ids agree
    because ADMISSIONS and DIAGNOSES_ICD number visits in the same order)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        yield from _zip_csv(zf, sink, "PATIENTS.csv", PATIENTS_HEADER,
                            _patients_rows(rows_factory(), context))
        yield from _zip_csv(zf, sink, "ADMISSIONS.csv", ADMISSIONS_HEADER,
                            _admissions_rows(rows_factory(), context))
        yield from _zip_csv(zf, sink, "DIAGNOSES_ICD.csv", DIAGNOSES_HEADER,
                            _diagnoses_rows(rows_factory()))
    yield sink.drain()


def stream(fmt: str, rows_factory: Callable[[], Iterable[dict]], meta: dict,
           context: ExportContext | None = None) -> Iterator[bytes]:
    """The bytes of a result in ``fmt``; ``rows_factory()`` yields the patients afresh (the
    zipped table formats make one pass per table). ``context`` defaults to the default dating
    scheme salted with ``meta["id"]`` and no Athena vocabulary."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    context = context or ExportContext.for_result(str(meta.get("id", "")))
    if fmt == "json":
        return _json(rows_factory(), meta, context)
    if fmt == "ndjson":
        return _ndjson(rows_factory(), context)
    if fmt == "csv":
        return _csv(rows_factory(), context)
    if fmt == "mimic3":
        return _mimic3_files(rows_factory, context)
    if fmt == "omop":
        from app.service.export_omop import omop_zip

        return omop_zip(rows_factory, context)
    if fmt == "fhir":
        from app.service.export_fhir import fhir_ndjson

        return fhir_ndjson(rows_factory(), context, str(meta.get("id", "")))
    from app.service.export_parquet import parquet_stream

    return parquet_stream(rows_factory(), context)
