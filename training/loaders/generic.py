"""Generic long-format loader: one row per diagnosis, CSV (optionally gzipped) or Parquet.

Columns: ``patient_id, visit_id, code, age, sex`` and optionally ``visit_time``. Visits are
ordered by ``visit_time`` when present, else by first appearance in the file. ``age`` is the
patient's age at that visit (the first visit's age is used). This is also the format that
``synthehr data simulate`` writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import Corpus, DropLog
from training.loaders.common import (DataError, assemble, normalize_code_column, normalize_sex,
                                     parse_dates, read_table)

REQUIRED = ["patient_id", "visit_id", "code", "age", "sex"]


def load_generic(path: str | Path) -> Corpus:
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
    if "visit_time" in table.columns:
        order = parse_dates(table["visit_time"], path.name, "visit_time")
    else:
        order = pd.Series(np.arange(len(table)), index=table.index)
    # Visit ids need only be unique within a patient.
    visit_key = table["patient_id"].astype("string") + "\x1f" + table["visit_id"].astype("string")
    rows = pd.DataFrame({"patient_id": table["patient_id"], "visit_id": visit_key,
                         "order": order, "age": age, "sex": normalize_sex(table["sex"])})
    visits = rows.sort_values("order", kind="stable").drop_duplicates("visit_id")
    codes = pd.DataFrame({"visit_id": visit_key,
                          "code": normalize_code_column(table["code"], path.name, "code", drops)})
    raw = {"rows": len(table), "patients": int(table["patient_id"].nunique()),
           "visits": int(visit_key.nunique())}
    return assemble("generic", visits, codes, drops, raw)
