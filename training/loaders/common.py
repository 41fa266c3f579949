"""What every loader shares: reading tables with clear errors, normalising codes with counted
drops, and assembling visits and diagnosis rows into :class:`app.corpus.Patient` objects.

A loader reduces its source to two frames and hands them to :func:`assemble`:

- ``visits``: one row per visit: ``patient_id``, ``visit_id``, ``order`` (sorts visits in time),
  ``age`` (years at that visit), ``sex`` (``F``/``M``; anything else drops the patient).
- ``codes``: one row per diagnosis: ``visit_id``, ``code`` (already canonical).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import AGE_CAP, Corpus, DropLog, Patient
from app.icd9.codes import InvalidCodeError, normalize_code
from app.icd9.hierarchy import chapter_of

__all__ = ["DataError", "find_table", "read_table", "normalize_code_column", "parse_dates",
           "normalize_sex", "assemble"]

TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet")


class DataError(ValueError):
    """Bad input that stops loading; the message names the file, and the row and column where
    one is to blame."""

    def __init__(self, file: str | Path, message: str, row: int | None = None,
                 column: str | None = None) -> None:
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
        self.file, self.row, self.column = str(file), row, column


def find_table(folder: Path, stem: str) -> Path:
    """The file for table ``stem`` in ``folder``: any case, ``.csv``, ``.csv.gz`` or ``.parquet``."""
    if not folder.is_dir():
        raise DataError(folder, "no such folder")
    wanted = {stem.lower() + suffix for suffix in TABLE_SUFFIXES}
    for path in sorted(folder.iterdir()):
        if path.name.lower() in wanted:
            return path
    raise DataError(folder, f"missing table {stem!r} (looked for {stem}.csv, {stem}.csv.gz or "
                            f"{stem}.parquet in any letter case)")


def read_table(path: Path, required: list[str]) -> pd.DataFrame:
    """Read a CSV (optionally gzipped) or Parquet table as strings with lower-case headers.

    Raises :class:`DataError` for a missing or empty file or a missing required column.
    """
    if not path.is_file():
        raise DataError(path, "no such file")
    try:
        if path.name.lower().endswith(".parquet"):
            frame = pd.read_parquet(path).astype("string")
        else:
            frame = pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty (no header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise DataError(path, f"cannot be parsed: {err}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}; found "
                              f"{', '.join(frame.columns) or 'none'}")
    return frame


def _canonical_or_none(raw: str) -> str | None:
    try:
        code = normalize_code(raw)
        chapter_of(code)
    except InvalidCodeError:
        return None
    return code


def normalize_code_column(values: pd.Series, file: str, column: str,
                          drops: DropLog) -> pd.Series:
    """Canonical codes for ``values``; null or non-ICD-9 entries become NA and are counted in
    ``drops`` with file, row and column of the first examples (rows are taken from the index,
    which must hold each value's 0-based data row in the file)."""
    raw = values.astype("string").str.strip()
    missing = raw.isna() | raw.isin(["", "?", "nan", "NaN", "NULL"])
    mapping = {v: _canonical_or_none(v) for v in raw[~missing].unique()}
    codes = raw.map(mapping).astype("string")
    codes[missing] = pd.NA
    positions = raw.index.to_numpy()
    drops.add_rows("missing code", file, column, positions[missing.to_numpy()])
    bad = (codes.isna() & ~missing).to_numpy()
    drops.add_rows("not an ICD-9-CM code", file, column, positions[bad], raw.to_numpy()[bad])
    return codes


def parse_dates(values: pd.Series, file: str, column: str) -> pd.Series:
    """Parse timestamps at second resolution (MIMIC's shifted dates lie outside the ns range).
    A present but unparseable value raises :class:`DataError` naming its row."""
    text = values.astype("string").str.strip()
    parsed = pd.to_datetime(text, errors="coerce", format="mixed").astype("datetime64[s]")
    bad = np.flatnonzero((parsed.isna() & text.notna()).to_numpy())
    if bad.size:
        row = int(bad[0])
        raise DataError(file, f"unparseable date {text.iloc[row]!r}", row=row + 1, column=column)
    return parsed


_SEX = {"F": "F", "FEMALE": "F", "M": "M", "MALE": "M"}


def normalize_sex(values: pd.Series) -> pd.Series:
    """``F``/``M`` from the usual spellings; anything else becomes NA."""
    return values.astype("string").str.strip().str.upper().map(_SEX).astype("string")


def assemble(source: str, visits: pd.DataFrame, codes: pd.DataFrame, drops: DropLog,
             raw_counts: dict[str, int]) -> Corpus:
    """Build patients from a visits frame and a codes frame (see the module docstring).

    Age is taken at each patient's first visit in time and capped at 90. Patients with unknown
    sex or age, visits without a valid code, and patients left without visits are dropped and
    counted.
    """
    visits = visits.sort_values(["patient_id", "order", "visit_id"], kind="stable")
    first = visits.groupby("patient_id", sort=False).head(1).set_index("patient_id")
    ages = pd.to_numeric(first["age"], errors="coerce").clip(upper=AGE_CAP)
    sexes = first["sex"]
    bad_sex = sexes.isna()
    bad_age = ages.isna() | (ages < 0)
    drops.add("patient with unknown sex", int(bad_sex.sum()))
    drops.add("patient with missing or negative age", int((bad_age & ~bad_sex).sum()))
    keep = ~(bad_sex | bad_age)

    codes = codes.dropna(subset=["code"]).drop_duplicates(["visit_id", "code"])
    known_visits = set(visits["visit_id"])
    orphan = ~codes["visit_id"].isin(known_visits)
    drops.add("diagnosis of an unknown visit", int(orphan.sum()))
    codes = codes[~orphan]
    by_visit: dict[object, list[str]] = {}
    for visit_id, code in zip(codes["visit_id"].to_numpy(), codes["code"].to_numpy()):
        by_visit.setdefault(visit_id, []).append(str(code))
    age_of = ages.to_dict()
    sex_of = sexes.to_dict()

    patients: list[Patient] = []
    empty_visits = 0
    keep_ids = set(keep.index[keep.to_numpy()])
    # One pass over visits sorted by patient: far faster than iterating groupby groups.
    current: object = None
    current_visits: list[tuple[str, ...]] = []

    def close(patient_id: object, patient_visits: list[tuple[str, ...]]) -> None:
        if not patient_visits:
            drops.add("patient without any coded visit")
            return
        patients.append(Patient(str(patient_id), float(age_of[patient_id]),
                                str(sex_of[patient_id]), tuple(patient_visits)))

    for patient_id, visit_id in zip(visits["patient_id"].to_numpy(),
                                    visits["visit_id"].to_numpy()):
        if patient_id not in keep_ids:
            continue
        if patient_id != current:
            if current is not None:
                close(current, current_visits)
            current, current_visits = patient_id, []
        visit_codes = by_visit.get(visit_id)
        if visit_codes:
            current_visits.append(tuple(visit_codes))
        else:
            empty_visits += 1
    if current is not None:
        close(current, current_visits)
    drops.add("visit without a valid code", empty_visits)
    return Corpus(source=source, patients=patients, drops=drops, raw_counts=raw_counts)
