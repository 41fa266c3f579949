"""MIMIC-III loader: ``PATIENTS``, ``ADMISSIONS`` and ``DIAGNOSES_ICD`` (upper- or lower-case
headers and file names; ``.csv``, ``.csv.gz`` or ``.parquet``).

A visit is an admission (``hadm_id``) ordered by ``admittime``; age is ``admittime - dob`` at the
first admission (MIMIC shifts the dates of patients over 89 by 300 years, which the cap at 90
absorbs).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from app.corpus import Corpus, DropLog
from training.loaders.common import (assemble, find_table, normalize_code_column,
                                     normalize_sex, parse_dates, read_table)

SECONDS_PER_YEAR = 365.2425 * 24 * 3600


def load_mimic3(folder: str | Path) -> Corpus:
    """Load a MIMIC-III folder into a corpus."""
    folder = Path(folder)
    drops = DropLog()
    pat_path = find_table(folder, "PATIENTS")
    adm_path = find_table(folder, "ADMISSIONS")
    dx_path = find_table(folder, "DIAGNOSES_ICD")
    patients = read_table(pat_path, ["subject_id", "gender", "dob"])
    admissions = read_table(adm_path, ["subject_id", "hadm_id", "admittime"])
    diagnoses = read_table(dx_path, ["hadm_id", "icd9_code"])

    dob = parse_dates(patients["dob"], pat_path.name, "dob")
    demo = pd.DataFrame({"subject_id": patients["subject_id"], "dob": dob,
                         "sex": normalize_sex(patients["gender"])}).drop_duplicates("subject_id")
    admit = parse_dates(admissions["admittime"], adm_path.name, "admittime")
    visits = pd.DataFrame({"patient_id": admissions["subject_id"],
                           "visit_id": admissions["hadm_id"], "order": admit})
    unknown = ~visits["patient_id"].isin(demo["subject_id"])
    drops.add("admission of a patient missing from PATIENTS", int(unknown.sum()))
    visits = visits[~unknown].merge(demo, left_on="patient_id", right_on="subject_id")
    visits["age"] = (visits["order"] - visits["dob"]).dt.total_seconds() / SECONDS_PER_YEAR

    codes = pd.DataFrame({"visit_id": diagnoses["hadm_id"],
                          "code": normalize_code_column(diagnoses["icd9_code"], dx_path.name,
                                                        "icd9_code", drops)})
    raw = {"patients": len(patients), "admissions": len(admissions),
           "diagnosis rows": len(diagnoses)}
    return assemble("mimic3", visits, codes, drops, raw)
