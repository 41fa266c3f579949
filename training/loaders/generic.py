"""Generic long-format loader: one row per diagnosis, CSV (optionally gzipped) or Parquet.

Columns: ``patient_id, visit_id, code, age, sex`` and optionally ``visit_time``. Visits are
ordered by the parsed ``visit_time`` when present (a visit's time is its earliest row's; visits
without one sort last and leave their patient without visit times), else by first appearance in
the file. ``visit_time`` is ISO 8601 (``2012-03-15`` or ``2012-03-15 08:30``) unless
``date_format`` (``--date-format``, strptime codes such as ``%m/%d/%Y``) gives the one format the
column uses; dates are never guessed, and a value in another format stops loading. Each visit's
time is a point: ``visit_times`` holds ``(t, t)``. ``age`` is the patient's age at that visit
(the first visit's age is used); text that is no number stops loading, an empty or negative age
drops the patient. This is also the format that ``synthehr data simulate`` writes.
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
    parse_dates,
    read_table,
)

REQUIRED = ["patient_id", "visit_id", "code", "age", "sex"]


def load_generic(path: str | Path, date_format: str | None = None) -> Corpus:
    """Load a generic long CSV/Parquet file into a corpus."""
    path = Path(path)
    drops = DropLog()
    table = read_table(path, REQUIRED)
    if table.empty:
        raise DataError(path, "file has a header but no rows")
    age = pd.to_numeric(table["age"], errors="coerce")
    bad = np.flatnonzero((age.isna() & table["age"].notna()).to_numpy())
    if bad.size:
        raise DataError(path.name, f"age {table['age'].iloc[bad[0]]!r} is not a number",
                        row=int(bad[0]) + 1, column="age")
    rows = np.arange(len(table))
    if "visit_time" in table.columns:
        order = parse_dates(table["visit_time"], path.name, "visit_time", date_format)
    elif date_format is not None:
        raise DataError(path.name, "--date-format given but the file has no visit_time column")
    else:
        order = pd.Series(rows, index=table.index)
    # Visit ids need only be unique within a patient.
    visit_key = table["patient_id"].astype("string") + "\x1f" + table["visit_id"].astype("string")
    frame = pd.DataFrame({"patient_id": table["patient_id"], "visit_id": visit_key,
                          "order": order, "age": age, "sex": normalize_sex(table["sex"]),
                          "row": rows, "sex_row": rows, "age_row": rows,
                          "sex_raw": table["sex"], "age_raw": table["age"]})
    if "visit_time" in table.columns:
        frame["start"] = frame["end"] = order
    visits = frame.sort_values("order", kind="stable").drop_duplicates("visit_id")
    codes = pd.DataFrame({"visit_id": visit_key,
                          "code": normalize_code_column(table["code"], path.name, "code", drops),
                          "row": rows, "column": "code"})
    raw = {"rows": len(table), "patients": int(table["patient_id"].nunique()),
           "visits": int(visit_key.nunique())}
    where = {"visit": (path.name, "visit_id"), "sex": (path.name, "sex"),
             "age": (path.name, "age"), "code": path.name}
    return assemble("generic", visits, codes, drops, raw, where)
