"""MIMIC-IV loader: the ``hosp/`` module's ``patients``, ``admissions`` and ``diagnoses_icd``.

Only ICD-9 rows (``icd_version == 9``) are kept; ICD-10 rows are counted as dropped. Codes may be
dotted or undotted. Age at an admission is ``anchor_age + year(admittime) - anchor_year``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from app.corpus import Corpus, DropLog
from training.loaders.common import (DataError, assemble, find_table, normalize_code_column,
                                     normalize_sex, parse_dates, read_table)


def load_mimic4(folder: str | Path) -> Corpus:
    """Load a MIMIC-IV folder (the ``hosp/`` folder itself or its parent) into a corpus."""
    folder = Path(folder)
    if (folder / "hosp").is_dir():
        folder = folder / "hosp"
    drops = DropLog()
    pat_path = find_table(folder, "patients")
    adm_path = find_table(folder, "admissions")
    dx_path = find_table(folder, "diagnoses_icd")
    patients = read_table(pat_path, ["subject_id", "gender", "anchor_age", "anchor_year"])
    admissions = read_table(adm_path, ["subject_id", "hadm_id", "admittime"])
    diagnoses = read_table(dx_path, ["hadm_id", "icd_code", "icd_version"])

    anchor_age = pd.to_numeric(patients["anchor_age"], errors="coerce")
    anchor_year = pd.to_numeric(patients["anchor_year"], errors="coerce")
    for name, parsed in (("anchor_age", anchor_age), ("anchor_year", anchor_year)):
        bad = (parsed.isna() & patients[name].notna()).to_numpy().nonzero()[0]
        if bad.size:
            raise DataError(pat_path.name, f"not a number: {patients[name].iloc[bad[0]]!r}",
                            row=int(bad[0]) + 1, column=name)
    demo = pd.DataFrame({"subject_id": patients["subject_id"], "anchor_age": anchor_age,
                         "anchor_year": anchor_year, "sex": normalize_sex(patients["gender"])})
    admit = parse_dates(admissions["admittime"], adm_path.name, "admittime")
    visits = pd.DataFrame({"patient_id": admissions["subject_id"],
                           "visit_id": admissions["hadm_id"], "order": admit})
    unknown = ~visits["patient_id"].isin(demo["subject_id"])
    drops.add("admission of a patient missing from patients", int(unknown.sum()))
    visits = visits[~unknown].merge(demo.drop_duplicates("subject_id"), left_on="patient_id",
                                    right_on="subject_id")
    visits["age"] = visits["anchor_age"] + visits["order"].dt.year - visits["anchor_year"]

    version = diagnoses["icd_version"].astype("string").str.strip()
    icd10 = version != "9"
    drops.add("not an ICD-9 row (icd_version != 9)", int(icd10.sum()))
    diagnoses = diagnoses[~icd10.fillna(True)]
    codes = pd.DataFrame({"visit_id": diagnoses["hadm_id"],
                          "code": normalize_code_column(diagnoses["icd_code"], dx_path.name,
                                                        "icd_code", drops)})
    raw = {"patients": len(patients), "admissions": len(admissions),
           "diagnosis rows": len(version), "ICD-9 diagnosis rows": len(diagnoses)}
    return assemble("mimic4", visits, codes, drops, raw)
