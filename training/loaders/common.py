"""What every loader shares: reading tables with clear errors, parsing dates without guessing,
normalising codes with counted drops, and assembling visits and diagnosis rows into
:class:`app.corpus.Patient` objects.

A loader reduces its source to two frames and hands them to :func:`assemble`:

- ``visits``: one row per visit: ``patient_id``, ``visit_id``, ``order`` (sorts visits in time;
  a parsed timestamp where the source has one, never text), ``age`` (years at that visit),
  ``sex`` (``F``/``M``; anything else drops the patient). Optional: ``start`` and ``end``
  (``datetime64[s]`` visit times, which fill :attr:`Patient.visit_times`), ``row`` (the visit's
  0-based data row, for examples), ``sex_row``/``sex_raw`` and ``age_row``/``age_raw`` (where a
  patient's sex and age were read, and the raw text, for examples of patient drops), and, where
  rows come from several files, ``file``, ``sex_file`` and ``age_file``.
- ``codes``: one row per diagnosis: ``visit_id``, ``code`` (already canonical), optionally
  ``row`` (0-based data row), ``column`` (the column it was read from) and ``file``.

``where`` tells :func:`assemble` which file and column each of those rows refers to, so every
drop reason carries examples with file, 1-based data row (header excluded), column and value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import AGE_CAP, Corpus, DropLog, Patient, describe_row
from app.icd9.codes import InvalidCodeError, looks_like_icd10, normalize_code
from app.icd9.hierarchy import chapter_of

__all__ = [
    "CHUNK_ROWS",
    "ICD10_REASON",
    "ISO_HELP",
    "MAX_DROP_SHARE",
    "DataError",
    "assemble",
    "check_kept",
    "find_table",
    "normalize_code_column",
    "normalize_sex",
    "parse_dates",
    "parse_version",
    "read_table",
    "read_table_chunks",
]

TABLE_SUFFIXES = (".csv", ".csv.gz", ".csv.zip", ".parquet")
# Rows per chunk where a loader reads a large file in chunks (DE-SynPUF claims files).
CHUNK_ROWS = 50_000
# A load that drops more than this share of the patients it read stops with an error.
MAX_DROP_SHARE = 0.5
ISO_HELP = "ISO 8601 (YYYY-MM-DD, optionally followed by HH:MM or HH:MM:SS)"
ICD10_REASON = "ICD-10-CM code (ICD-10-CM is not modelled; only ICD-9-CM codes are used)"
PATIENT_LEVEL = "patient"


class DataError(ValueError):
    """Bad input that stops loading; the message names the file, and the row (1-based data row,
    header excluded) and column where one is to blame."""

    def __init__(self, file: str | Path, message: str, row: int | None = None,
                 column: str | None = None) -> None:
        if row is not None:
            where = describe_row(str(file), row, column)
        else:
            where = str(file) + (f", column {column}" if column is not None else "")
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


def read_table(path: Path, required: list[str], usecols: Callable[[str], bool] | None = None
               ) -> pd.DataFrame:
    """Read a CSV (optionally gzipped or zipped) or Parquet table as strings with lower-case
    headers; ``usecols`` (given a lower-case header) limits the columns read, to save memory.

    Raises :class:`DataError` for a missing or empty file or a missing required column.
    """
    if not path.is_file():
        raise DataError(path, "no such file")
    keep = None if usecols is None else (lambda c: str(c).strip().lower() in required
                                         or usecols(str(c).strip().lower()))
    try:
        if path.name.lower().endswith(".parquet"):
            frame = pd.read_parquet(path)
            if keep is not None:
                frame = frame[[c for c in frame.columns if keep(c)]]
            frame = frame.astype("string")
        else:
            frame = pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""],
                                usecols=keep)
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty (no header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise DataError(path, f"cannot be parsed: {err}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        found = "" if usecols else f"; found {', '.join(frame.columns) or 'none'}"
        raise DataError(path, f"missing column(s) {', '.join(missing)}{found}")
    return frame


def _parquet_chunks(path: Path, keep: Callable[[object], bool],
                    chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    names = [c for c in source.schema_arrow.names if keep(c)]
    offset = 0
    for batch in source.iter_batches(batch_size=chunk_rows, columns=names):
        frame = batch.to_pandas().astype("string")
        frame.index = pd.RangeIndex(offset, offset + len(frame))
        offset += len(frame)
        yield frame


def read_table_chunks(path: Path, required: list[str], usecols: Callable[[str], bool],
                      chunk_rows: int) -> Iterator[pd.DataFrame]:
    """:func:`read_table` in chunks of ``chunk_rows`` rows, so that a large file's peak memory
    is about one chunk's; each chunk's index holds its rows' 0-based data row numbers."""
    if not path.is_file():
        raise DataError(path, "no such file")

    def keep(c: object) -> bool:
        name = str(c).strip().lower()
        return name in required or usecols(name)

    try:
        chunks = (_parquet_chunks(path, keep, chunk_rows)
                  if path.name.lower().endswith(".parquet") else
                  pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""],
                              usecols=keep, chunksize=chunk_rows))
        first = True
        for frame in chunks:
            frame.columns = [str(c).strip().lower() for c in frame.columns]
            missing = [c for c in required if c not in frame.columns] if first else []
            if missing:
                raise DataError(path, f"missing column(s) {', '.join(missing)}")
            first = False
            yield frame
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty (no header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise DataError(path, f"cannot be parsed: {err}") from None


def _canonical_or_none(raw: str) -> str | None:
    try:
        code = normalize_code(raw)
        chapter_of(code)
    except InvalidCodeError:
        return None
    return code


MISSING_TEXT = ("", "?", "nan", "NaN", "NULL")


def normalize_code_column(values: pd.Series, file: str, column: str,
                          drops: DropLog, count_missing: bool = True) -> pd.Series:
    """Canonical codes for ``values``; null or non-ICD-9 entries become NA and are counted in
    ``drops`` with file, row, column and value of the first examples (rows are taken from the
    index, which must hold each value's 0-based data row in the file). ICD-10-CM-shaped values
    get their own reason, which says that ICD-10-CM is not modelled. ``count_missing=False``
    leaves empty cells uncounted (unused slots of a wide table are not drops)."""
    raw = values.astype("string").str.strip()
    missing = raw.isna() | raw.isin(MISSING_TEXT)
    mapping = {v: _canonical_or_none(v) for v in raw[~missing].unique()}
    codes = raw.map(mapping).astype("string")
    codes[missing] = pd.NA
    positions = raw.index.to_numpy()
    if count_missing:
        drops.add_rows("missing code", file, column, positions[missing.to_numpy()])
    bad = (codes.isna() & ~missing).to_numpy()
    if bad.any():
        bad_values = raw.to_numpy()[bad]
        icd10 = np.array([looks_like_icd10(v) for v in bad_values], dtype=bool)
        drops.add_rows(ICD10_REASON, file, column, positions[bad][icd10], bad_values[icd10])
        drops.add_rows("not an ICD-9-CM code", file, column, positions[bad][~icd10],
                       bad_values[~icd10])
    return codes


_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?$", re.ASCII)


def _parse_one(text: str, date_format: str | None) -> np.datetime64:
    if date_format is None:
        if not _ISO.match(text):
            raise ValueError("not ISO 8601")
        return np.datetime64(text.replace(" ", "T"), "s")
    return np.datetime64(datetime.strptime(text, date_format), "s")


def parse_dates(values: pd.Series, file: str, column: str,
                date_format: str | None = None) -> pd.Series:
    """Parse timestamps at second resolution (MIMIC's shifted dates lie outside pandas'
    nanosecond range); empty values become NaT.

    Dates are never guessed: without ``date_format`` every value must be ISO 8601; with it
    (``strptime`` codes, e.g. ``%m/%d/%Y``) every value must match it. The first value that does
    not, including a column that mixes formats, raises :class:`DataError` naming its file, row,
    column and value.
    """
    text = values.astype("string").str.strip()
    present = text.notna() & (text != "")
    parsed: dict[str, np.datetime64] = {}
    for value in text[present].unique():
        try:
            parsed[value] = _parse_one(value, date_format)
        except ValueError as err:
            row = int(np.flatnonzero((text == value).fillna(False).to_numpy())[0]) + 1
            if date_format is None:
                hint = (f"is not {ISO_HELP}; dates are never guessed: give the column's format "
                        "with --date-format (strptime codes, e.g. '%m/%d/%Y')")
            else:
                hint = f"does not match the date format {date_format!r} ({err})"
            if date_format is None and _ISO.match(value):
                hint = f"is not a valid date ({err})"
            raise DataError(file, f"date {value!r} {hint}", row=row, column=column) from None
    out = np.full(len(text), np.datetime64("NaT"), dtype="datetime64[s]")
    mask = present.to_numpy()
    out[mask] = [parsed[v] for v in text[present]]
    return pd.Series(out, index=values.index)


def parse_version(values: pd.Series, file: str, column: str) -> pd.Series:
    """An ICD version column as numbers: ``9``, ``9.0`` and ``"9"`` are all 9 (Parquet writers
    often store integers as floats). Text that is no number raises :class:`DataError`."""
    text = values.astype("string").str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    bad = np.flatnonzero((numbers.isna() & text.notna() & (text != "")).to_numpy())
    if bad.size:
        raise DataError(file, f"ICD version {text.iloc[bad[0]]!r} is not a number (9 or 10)",
                        row=int(bad[0]) + 1, column=column)
    return numbers


_SEX = {"F": "F", "FEMALE": "F", "M": "M", "MALE": "M"}


def normalize_sex(values: pd.Series) -> pd.Series:
    """``F``/``M`` from the usual spellings; anything else becomes NA."""
    return values.astype("string").str.strip().str.upper().map(_SEX).astype("string")


def _examples(drops: DropLog, reason: str, count: int, texts: list[str],
              level: str | None = None) -> None:
    drops.add(reason, count, level=level)
    for text in texts[: drops.max_examples]:
        drops.example(reason, text)


def _at(file: str, row: int, column: str | None, value: object, fallback: str) -> str:
    """An example's text: the file position where one is known, else ``fallback``."""
    return describe_row(file, row + 1, column, value) if file and row >= 0 else fallback


def _where_of(frame: pd.DataFrame, ids: np.ndarray, kind: str,
              where: dict[str, tuple[str, str]]) -> list[str]:
    """Example texts for the first few ``ids`` (patients) from the ``<kind>_row/_raw/_file``
    columns."""
    out = []
    file, column = where.get(kind, ("", kind))
    for patient_id in ids[:3]:
        rec = frame.loc[patient_id]
        row = int(rec[f"{kind}_row"]) if f"{kind}_row" in frame.columns else -1
        out.append(f"patient {patient_id}" + (": " + _at(
            str(rec.get(f"{kind}_file", file)), row, column, rec.get(f"{kind}_raw"), "")
            if row >= 0 else ""))
    return out


def _codes_by_visit(visit_key: np.ndarray, code_key: np.ndarray, names: list[str],
                    n_visits: int) -> list[tuple[str, ...] | None]:
    """Per visit key, its codes in input order (one shared string object per distinct code)."""
    order = np.argsort(visit_key, kind="stable")
    sorted_v, sorted_c = visit_key[order], code_key[order]
    out: list[tuple[str, ...] | None] = [None] * n_visits
    if sorted_v.size == 0:
        return out
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], sorted_v.size]
    codes = sorted_c.tolist()
    for v, lo, hi in zip(sorted_v[starts].tolist(), starts.tolist(), ends.tolist()):
        out[v] = tuple(names[c] for c in codes[lo:hi])
    return out


def assemble(source: str, visits: pd.DataFrame, codes: pd.DataFrame, drops: DropLog,
             raw_counts: dict[str, int], where: dict | None = None) -> Corpus:
    """Build patients from a visits frame and a codes frame (see the module docstring).

    Visits are sorted by ``order`` (ties keep file order). Age is taken at each patient's first
    visit in time and capped at 90. Patients with unknown sex or a missing or negative age,
    visits without a valid code, patients left without visits, and repeated codes within a visit
    are dropped and counted with examples. ``where`` maps ``"visit"``, ``"sex"`` and ``"age"``
    to ``(file, column)`` and ``"code"`` to the diagnosis file.
    """
    where = where or {}
    visits = visits.sort_values(["patient_id", "order"], kind="stable", na_position="last")
    first = visits.groupby("patient_id", sort=False).head(1).set_index("patient_id")
    ages = pd.to_numeric(first["age"], errors="coerce").clip(upper=AGE_CAP)
    sexes = first["sex"]
    bad_sex = sexes.isna().to_numpy()
    bad_age = (ages.isna() | (ages < 0)).to_numpy() & ~bad_sex
    ids = first.index.to_numpy()
    _examples(drops, "patient with unknown sex", int(bad_sex.sum()),
              _where_of(first, ids[bad_sex], "sex", where), PATIENT_LEVEL)
    _examples(drops, "patient with missing or negative age", int(bad_age.sum()),
              _where_of(first, ids[bad_age], "age", where), PATIENT_LEVEL)
    keep_ids = set(ids[~(bad_sex | bad_age)])

    # Integer keys: visit ids and codes are compared and grouped as numbers, not strings, and
    # every occurrence of a code shares one string object (memory grows with distinct codes).
    visit_key, visit_uniques = pd.factorize(visits["visit_id"])
    code_file = where.get("code", "")
    codes = codes.dropna(subset=["code"])
    if "row" not in codes.columns:
        codes = codes.assign(row=-1)
    if "column" not in codes.columns:
        codes = codes.assign(column="code")
    if "file" not in codes.columns:
        codes = codes.assign(file=code_file)
    code_visit = pd.Index(visit_uniques).get_indexer(codes["visit_id"])
    code_key, code_names = pd.factorize(codes["code"])
    pair = code_visit.astype(np.int64) * (len(code_names) + 1) + code_key
    duplicate = pd.Series(pair).duplicated().to_numpy()
    orphan = ~duplicate & (code_visit < 0)
    for reason, mask in (("duplicate code within a visit", duplicate),
                         ("diagnosis of an unknown visit", orphan)):
        drops.add(reason, int(mask.sum()))
        for _, rec in codes[mask].head(drops.max_examples).iterrows():
            shown_visit = str(rec["visit_id"]).replace("\x1f", " visit ")
            drops.example(reason, _at(str(rec["file"]), int(rec["row"]), str(rec["column"]),
                                      rec["code"], f"visit {shown_visit} code {rec['code']}"))
    kept = ~(duplicate | orphan)
    names = [str(c) for c in code_names]
    by_visit = _codes_by_visit(code_visit[kept], code_key[kept], names, len(visit_uniques))
    age_of = ages.to_dict()
    sex_of = sexes.to_dict()

    visit_file, visit_column = where.get("visit", ("", "visit_id"))
    visit_files = (visits["file"].to_numpy() if "file" in visits.columns
                   else np.full(len(visits), visit_file, dtype=object))
    visit_rows = (visits["row"].to_numpy() if "row" in visits.columns
                  else np.full(len(visits), -1))
    visit_ids = visits["visit_id"].to_numpy()

    def visit_at(i: int) -> str:
        raw = visit_ids[i]
        shown = str(raw).replace("\x1f", " visit ")
        # Integer keys that a loader made up are not worth showing: the row points at the visit.
        value = None if isinstance(raw, (int, np.integer)) else shown
        return _at(str(visit_files[i]), int(visit_rows[i]), visit_column, value,
                   f"patient {shown}" if "\x1f" in shown else f"visit {shown}")

    has_times = "start" in visits.columns
    if has_times:
        start = visits["start"].to_numpy(dtype="datetime64[s]")
        end = visits["end"].to_numpy(dtype="datetime64[s]")
        start_s = start.astype(np.int64)
        end_s = np.where(np.isnat(end), start_s, end.astype(np.int64))
        missing_time = np.isnat(start)
        reversed_ = ~missing_time & ~np.isnat(end) & (end_s < start_s)
        if reversed_.any():
            reason = "visit end before its start (end set to the start)"
            drops.add(reason, int(reversed_.sum()))
            for i in np.flatnonzero(reversed_)[: drops.max_examples]:
                drops.example(reason, visit_at(i))
            end_s = np.maximum(end_s, start_s)
        start_list, end_list = start_s.tolist(), end_s.tolist()  # whole seconds: exact
        missing_list = missing_time.tolist()

    patients: list[Patient] = []
    no_visit: list[object] = []
    empty_examples: list[str] = []
    empty_visits = 0
    # One pass over visits sorted by patient: far faster than iterating groupby groups.
    current: object = None
    current_visits: list[tuple[str, ...]] = []
    current_times: list[tuple[int, int]] | None = []

    def close(patient_id: object, patient_visits: list[tuple[str, ...]],
              times: list[tuple[int, int]] | None) -> None:
        if not patient_visits:
            no_visit.append(patient_id)
            return
        visit_times = None
        if times is not None:
            origin = times[0][0]
            visit_times = tuple(((s - origin) / 86400.0, (e - origin) / 86400.0)
                                for s, e in times)
        patients.append(Patient(str(patient_id), float(age_of[patient_id]),
                                str(sex_of[patient_id]), tuple(patient_visits), visit_times))

    for i, (patient_id, key) in enumerate(zip(visits["patient_id"].to_numpy(),
                                              visit_key.tolist())):
        if patient_id not in keep_ids:
            continue
        if patient_id != current:
            if current is not None:
                close(current, current_visits, current_times)
            current, current_visits = patient_id, []
            current_times = [] if has_times else None
        visit_codes = by_visit[key]
        if visit_codes:
            current_visits.append(visit_codes)
            if current_times is not None:
                if missing_list[i]:
                    current_times = None  # one visit without a time: no times for the patient
                else:
                    current_times.append((start_list[i], end_list[i]))
        else:
            empty_visits += 1
            if len(empty_examples) < drops.max_examples:
                empty_examples.append(visit_at(i))
    if current is not None:
        close(current, current_visits, current_times)
    _examples(drops, "visit without a valid code", empty_visits, empty_examples)
    _examples(drops, "patient without any coded visit", len(no_visit),
              [f"patient {p}" for p in no_visit], PATIENT_LEVEL)
    return Corpus(source=source, patients=patients, drops=drops, raw_counts=raw_counts)


def check_kept(corpus: Corpus, path: str | Path, max_drop_share: float = MAX_DROP_SHARE) -> None:
    """Refuse a load that keeps no patient, or drops more than ``max_drop_share`` of the
    patients it saw (patient-level drop reasons), naming the top drop reasons."""
    dropped = corpus.drops.patients_dropped
    seen = len(corpus.patients) + dropped
    if corpus.patients and dropped <= max_drop_share * seen:
        return
    top = "; ".join(f"{reason}: {count:,}" + (f" (e.g. {corpus.drops.examples[reason][0]})"
                                               if corpus.drops.examples.get(reason) else "")
                    for reason, count in corpus.drops.counts.most_common(3))
    what = ("no patient was kept" if not corpus.patients else
            f"{dropped:,} of {seen:,} patients were dropped (more than the allowed "
            f"{max_drop_share:.0%})")
    raise DataError(path, f"{what}; top drop reasons: {top or 'none (the source is empty)'}")
