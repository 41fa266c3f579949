"""Result formats, written as byte streams (a cohort is never held whole in memory as text).

Rows come from :func:`app.service.jobs.iter_result`: ``{"id", "n", "age", "sex", "visits"}``.

* ``json``   - one object: ``{"id", "bundle_version", "count", "patients": [...]}``;
* ``ndjson`` - one patient object a line;
  (patients in both carry each code with its category, chapter and description, as
  ``POST /v1/patients`` does)
* ``csv``    - the long format of the project's ``generic`` loader, one row per code:
  ``patient_id, visit_id, visit_seq, code, age, sex, category, chapter, description``;
* ``mimic3`` - a zip of ``PATIENTS.csv``, ``ADMISSIONS.csv`` and ``DIAGNOSES_ICD.csv`` in the
  MIMIC-III v1.4 schema: synthetic ``SUBJECT_ID``/``HADM_ID``/``ROW_ID`` and dates shifted into
  2100-2200 as MIMIC's are, so that a pipeline written for MIMIC-III reads it unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from functools import lru_cache

from app.icd9.codes import InvalidCodeError
from app.icd9.hierarchy import load_hierarchy

__all__ = ["FORMATS", "MEDIA_TYPES", "code_detail", "patient_out", "stream"]

FORMATS = ("json", "ndjson", "csv", "mimic3")
MEDIA_TYPES = {"json": "application/json", "ndjson": "application/x-ndjson",
               "csv": "text/csv; charset=utf-8", "mimic3": "application/zip"}
EXTENSIONS = {"json": "json", "ndjson": "ndjson", "csv": "csv", "mimic3": "zip"}
FLUSH_BYTES = 1 << 16


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


def patient_out(row: dict) -> dict:
    return {"patient_id": row["id"], "age": row["age"], "sex": row["sex"],
            "visits": [{"codes": [code_detail(c) for c in visit]} for visit in row["visits"]]}


def _json(rows: Iterable[dict], meta: dict) -> Iterator[bytes]:
    head = json.dumps(meta, separators=(",", ":"))[:-1]
    buf = [head.encode(), b',"patients":[']
    size = 0
    for i, row in enumerate(rows):
        part = (b"," if i else b"") + json.dumps(patient_out(row), separators=(",", ":")).encode()
        buf.append(part)
        size += len(part)
        if size >= FLUSH_BYTES:
            yield b"".join(buf)
            buf, size = [], 0
    buf.append(b"]}\n")
    yield b"".join(buf)


def _ndjson(rows: Iterable[dict]) -> Iterator[bytes]:
    buf: list[bytes] = []
    size = 0
    for row in rows:
        part = json.dumps(patient_out(row), separators=(",", ":")).encode() + b"\n"
        buf.append(part)
        size += len(part)
        if size >= FLUSH_BYTES:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


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
              "chapter", "description"]


def _csv(rows: Iterable[dict]) -> Iterator[bytes]:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        for seq, visit in enumerate(row["visits"], start=1):
            for code in visit:
                d = code_detail(code)
                writer.writerow([row["id"], f"{row['id']}-v{seq}", seq, code, row["age"],
                                 row["sex"], d["category"], d["chapter"],
                                 d["description"] or ""])
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
EPOCH = datetime(2100, 1, 1)
FMT = "%Y-%m-%d %H:%M:%S"


def _mix(n: int, salt: int) -> int:
    """A cheap deterministic integer hash (so dates do not encode the patient's order)."""
    x = (n * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    return x ^ (x >> 29)


def _admissions(row: dict) -> list[tuple[datetime, datetime]]:
    """Synthetic (admit, discharge) times of a patient's visits, in time order."""
    n = int(row["n"])
    first = EPOCH + timedelta(days=_mix(n, 1) % 36_500, minutes=_mix(n, 2) % 1440)
    times = []
    admit = first
    for k in range(len(row["visits"])):
        stay = timedelta(days=1 + _mix(n, 10 + k) % 10, minutes=_mix(n, 50 + k) % 1440)
        times.append((admit, admit + stay))
        admit = admit + stay + timedelta(days=14 + _mix(n, 100 + k) % 700)
    return times


def _zip_csv(zf: zipfile.ZipFile, sink: _Sink, name: str, header: list[str],
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


def _patients_rows(rows: Iterable[dict]) -> Iterator[list]:
    for row in rows:
        n = int(row["n"])
        admit = _admissions(row)[0][0] if row["visits"] else EPOCH
        dob = admit - timedelta(days=float(row["age"]) * 365.2425)
        dob = dob.replace(hour=0, minute=0, second=0, microsecond=0)
        yield [n, n, row["sex"], dob.strftime(FMT), "", "", "", 0]


def _admissions_rows(rows: Iterable[dict]) -> Iterator[list]:
    hadm = HADM_BASE
    for row in rows:
        n = int(row["n"])
        for admit, discharge in _admissions(row):
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


def _mimic3_files(rows_factory: Callable[[], Iterable[dict]]) -> Iterator[bytes]:
    """The MIMIC-III zip: three passes over the patients, one per table (admission ids agree
    because ADMISSIONS and DIAGNOSES_ICD number visits in the same order)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        yield from _zip_csv(zf, sink, "PATIENTS.csv", PATIENTS_HEADER,
                            _patients_rows(rows_factory()))
        yield from _zip_csv(zf, sink, "ADMISSIONS.csv", ADMISSIONS_HEADER,
                            _admissions_rows(rows_factory()))
        yield from _zip_csv(zf, sink, "DIAGNOSES_ICD.csv", DIAGNOSES_HEADER,
                            _diagnoses_rows(rows_factory()))
    yield sink.drain()


def stream(fmt: str, rows_factory: Callable[[], Iterable[dict]], meta: dict) -> Iterator[bytes]:
    """The bytes of a result in ``fmt``; ``rows_factory()`` yields the patients afresh (the
    MIMIC-III export makes three passes, one per table)."""
    if fmt == "json":
        return _json(rows_factory(), meta)
    if fmt == "ndjson":
        return _ndjson(rows_factory())
    if fmt == "csv":
        return _csv(rows_factory())
    if fmt == "mimic3":
        return _mimic3_files(rows_factory)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
