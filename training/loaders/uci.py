"""UCI Diabetes 130-US hospitals (1999-2008) loader: ``diabetic_data.csv(.gz)``.

One row per encounter; a patient is ``patient_nbr``, encounters are ordered by
``encounter_id`` (the file has no dates, so patients have no visit times). Codes come from
``diag_1..diag_3`` (dotted, leading zeros dropped, ``?`` for missing). Age is a 10-year bin such
as ``[70-80)``, read as its midpoint (``[90-100)`` caps at 90).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import Corpus, DropLog
from training.loaders.common import (
    DataError,
    assemble,
    normalize_code_column,
    normalize_sex,
    read_table,
)

DIAG_COLUMNS = ("diag_1", "diag_2", "diag_3")


def _locate(path: Path) -> Path:
    if path.is_dir():
        for name in ("diabetic_data.csv.gz", "diabetic_data.csv"):
            if (path / name).is_file():
                return path / name
        raise DataError(path, "missing diabetic_data.csv or diabetic_data.csv.gz")
    return path


def _bin_midpoint(values: pd.Series, file: str) -> pd.Series:
    parts = values.astype("string").str.extract(r"^\[(\d+)-(\d+)\)$")
    bad = parts[0].isna() & values.notna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(file, f"age {values.iloc[row]!r} is not a bin like '[70-80)'",
                        row=row + 1, column="age")
    return (pd.to_numeric(parts[0]) + pd.to_numeric(parts[1])) / 2


def load_uci(path: str | Path, date_format: str | None = None) -> Corpus:
    """Load the UCI Diabetes 130 file (or the folder holding it) into a corpus (the file has
    no dates: ``date_format`` must be None)."""
    if date_format is not None:
        raise ValueError("UCI Diabetes 130 has no date columns; --date-format does not apply")
    path = _locate(Path(path))
    drops = DropLog()
    table = read_table(path, ["encounter_id", "patient_nbr", "gender", "age", *DIAG_COLUMNS])
    order = pd.to_numeric(table["encounter_id"], errors="coerce")
    rows = np.arange(len(table))
    visits = pd.DataFrame({"patient_id": table["patient_nbr"], "visit_id": table["encounter_id"],
                           "order": order, "age": _bin_midpoint(table["age"], path.name),
                           "sex": normalize_sex(table["gender"]), "row": rows,
                           "sex_row": rows, "age_row": rows, "sex_raw": table["gender"],
                           "age_raw": table["age"]})
    codes = pd.concat(
        pd.DataFrame({"visit_id": table["encounter_id"],
                      "code": normalize_code_column(table[col], path.name, col, drops),
                      "row": rows, "column": col})
        for col in DIAG_COLUMNS)
    raw = {"patients": int(table["patient_nbr"].nunique()), "encounters": len(table),
           "diagnosis fields": len(table) * len(DIAG_COLUMNS)}
    where = {"visit": (path.name, "encounter_id"), "sex": (path.name, "gender"),
             "age": (path.name, "age"), "code": path.name}
    return assemble("uci", visits, codes, drops, raw, where)
