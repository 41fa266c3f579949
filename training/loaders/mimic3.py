"""MIMIC-III loader: ``PATIENTS``, ``ADMISSIONS`` and ``DIAGNOSES_ICD`` (upper- or lower-case
headers and file names; ``.csv``, ``.csv.gz`` or ``.parquet``).

A visit is an admission (``hadm_id``) ordered by the parsed ``admittime``; its visit time is
``admittime`` to ``dischtime`` (when the column is present). Age is ``admittime - dob`` at the
first admission (MIMIC shifts the dates of patients over 89 by 300 years, which the cap at 90
absorbs). Dates are ISO 8601 (as released) unless ``date_format`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import Corpus, DropLog
from training.loaders.common import (
    assemble,
    find_table,
    normalize_code_column,
    normalize_sex,
    parse_dates,
    read_table,
)

SECONDS_PER_YEAR = 365.2425 * 24 * 3600


def load_mimic3(folder: str | Path, date_format: str | None = None) -> Corpus:
    """Load a MIMIC-III folder into a corpus (``date_format``: see :func:`parse_dates`)."""
    folder = Path(folder)
    drops = DropLog()
    pat_path = find_table(folder, "PATIENTS")
    adm_path = find_table(folder, "ADMISSIONS")
    dx_path = find_table(folder, "DIAGNOSES_ICD")
    patients = read_table(pat_path, ["subject_id", "gender", "dob"])
    admissions = read_table(adm_path, ["subject_id", "hadm_id", "admittime"])
    diagnoses = read_table(dx_path, ["hadm_id", "icd9_code"])

    dob = parse_dates(patients["dob"], pat_path.name, "dob", date_format)
    demo = pd.DataFrame({"subject_id": patients["subject_id"], "dob": dob,
                         "sex": normalize_sex(patients["gender"]),
                         "sex_row": np.arange(len(patients)), "sex_raw": patients["gender"],
                         "age_raw": patients["dob"]}).drop_duplicates("subject_id")
    demo["age_row"] = demo["sex_row"]
    admit = parse_dates(admissions["admittime"], adm_path.name, "admittime", date_format)
    discharge = (parse_dates(admissions["dischtime"], adm_path.name, "dischtime", date_format)
                 if "dischtime" in admissions.columns else admit)
    visits = pd.DataFrame({"patient_id": admissions["subject_id"],
                           "visit_id": admissions["hadm_id"], "order": admit, "start": admit,
                           "end": discharge, "row": np.arange(len(admissions))})
    unknown = ~visits["patient_id"].isin(demo["subject_id"])
    drops.add_rows("admission of a patient missing from PATIENTS", adm_path.name, "subject_id",
                   np.flatnonzero(unknown.to_numpy()),
                   visits["patient_id"].to_numpy()[unknown.to_numpy()])
    visits = visits[~unknown].merge(demo, left_on="patient_id", right_on="subject_id")
    visits["age"] = (visits["order"] - visits["dob"]).dt.total_seconds() / SECONDS_PER_YEAR

    codes = pd.DataFrame({"visit_id": diagnoses["hadm_id"],
                          "code": normalize_code_column(diagnoses["icd9_code"], dx_path.name,
                                                        "icd9_code", drops),
                          "row": np.arange(len(diagnoses)), "column": "icd9_code"})
    raw = {"patients": len(patients), "admissions": len(admissions),
           "diagnosis rows": len(diagnoses)}
    where = {"visit": (adm_path.name, "hadm_id"), "sex": (pat_path.name, "gender"),
             "age": (pat_path.name, "dob"), "code": dx_path.name}
    return assemble("mimic3", visits, codes, drops, raw, where)
