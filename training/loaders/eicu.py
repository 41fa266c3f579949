"""eICU Collaborative Research Database loader: ``patient`` and ``diagnosis``.

A patient is ``uniquepid``; a visit is a hospital stay (``patienthealthsystemstayid``), whose
ICU stays' diagnoses are pooled. eICU has no absolute dates, so stays are ordered by
``hospitaldischargeyear`` and then by stay id (ids grow with time within the release). Age is
the age at the first stay's first ICU stay (``> 89`` reads as 90). ``icd9code`` holds
"ICD-9, ICD-10" lists such as ``"401.9, I10"``: every ICD-9 entry is kept, ICD-10 entries are
ignored, and a row with no ICD-9 entry is counted as dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import Corpus, DropLog
from training.loaders.common import (assemble, find_table, normalize_code_column,
                                     normalize_sex, read_table)


def _age(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip().replace({"> 89": "90"})
    return pd.to_numeric(text, errors="coerce")


def load_eicu(folder: str | Path) -> Corpus:
    """Load an eICU folder into a corpus."""
    folder = Path(folder)
    drops = DropLog()
    pat_path = find_table(folder, "patient")
    dx_path = find_table(folder, "diagnosis")
    stays = read_table(pat_path, ["patientunitstayid", "patienthealthsystemstayid", "uniquepid",
                                  "gender", "age", "hospitaldischargeyear"])
    diagnoses = read_table(dx_path, ["patientunitstayid", "icd9code"])

    unit_order = pd.to_numeric(stays.get("unitvisitnumber", pd.Series(dtype="string")),
                               errors="coerce")
    frame = pd.DataFrame({
        "patient_id": stays["uniquepid"],
        "visit_id": stays["patienthealthsystemstayid"],
        "year": pd.to_numeric(stays["hospitaldischargeyear"], errors="coerce"),
        "stay": pd.to_numeric(stays["patienthealthsystemstayid"], errors="coerce"),
        "unit": unit_order if len(unit_order) == len(stays) else np.nan,
        "age": _age(stays["age"]),
        "sex": normalize_sex(stays["gender"]),
    }).sort_values(["patient_id", "year", "stay", "unit"], kind="stable")
    # One row per hospital stay, carrying its first ICU stay's age and sex.
    visits = frame.drop_duplicates("visit_id").copy()
    visits["order"] = np.arange(len(visits))
    unit_to_visit = dict(zip(stays["patientunitstayid"], stays["patienthealthsystemstayid"]))

    tokens = diagnoses["icd9code"].astype("string").str.split(",").explode().str.strip()
    missing_rows = diagnoses["icd9code"].isna() | (diagnoses["icd9code"].str.strip() == "")
    positions = diagnoses.index.to_numpy()
    drops.add_rows("missing code", dx_path.name, "icd9code", positions[missing_rows.to_numpy()])
    present = tokens[tokens.notna() & (tokens != "")]
    # ICD-10 entries are expected here and not drops: normalise into a scratch log.
    codes = normalize_code_column(present, dx_path.name, "icd9code", DropLog())
    has_icd9 = codes.notna().groupby(level=0).any().reindex(diagnoses.index, fill_value=False)
    no_icd9 = ~has_icd9 & ~missing_rows
    drops.add_rows("row without an ICD-9 code", dx_path.name, "icd9code",
                   positions[no_icd9.to_numpy()],
                   diagnoses["icd9code"].to_numpy()[no_icd9.to_numpy()])
    codes = codes.dropna()
    unit_ids = diagnoses["patientunitstayid"].loc[codes.index]
    code_frame = pd.DataFrame({"visit_id": unit_ids.map(unit_to_visit).to_numpy(),
                               "code": codes.to_numpy()})
    unknown = code_frame["visit_id"].isna()
    drops.add("diagnosis of an unknown ICU stay", int(unknown.sum()))
    raw = {"patients": int(stays["uniquepid"].nunique()),
           "hospital stays": int(stays["patienthealthsystemstayid"].nunique()),
           "ICU stays": len(stays), "diagnosis rows": len(diagnoses)}
    return assemble("eicu", visits, code_frame[~unknown], drops, raw)
