"""MIMIC-IV loader: the ``hosp/`` module's ``patients``, ``admissions`` and ``diagnoses_icd``.

Only ICD-9 rows (``icd_version`` 9, written ``9``, ``9.0`` or ``"9"``) are kept; ICD-10 rows are
counted with examples and a hint that ICD-10-CM is not modelled. Codes may be dotted or
undotted (a dot anywhere, as in ``E87.82``). A visit is an admission ordered by the parsed
``admittime``, its visit time ``admittime`` to ``dischtime`` (when present). Age at an admission
is ``anchor_age + year(admittime) - anchor_year``. Dates are ISO 8601 (as released) unless
``date_format`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import Corpus, DropLog
from training.loaders.common import (
    DataError,
    assemble,
    find_table,
    normalize_code_column,
    normalize_sex,
    parse_dates,
    parse_version,
    read_table,
)

ICD10_ROW = "ICD-10 row (icd_version 10; ICD-10-CM is not modelled, only ICD-9-CM rows are used)"


def load_mimic4(folder: str | Path, date_format: str | None = None) -> Corpus:
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
    rows = np.arange(len(patients))
    demo = pd.DataFrame({"subject_id": patients["subject_id"], "anchor_age": anchor_age,
                         "anchor_year": anchor_year, "sex": normalize_sex(patients["gender"]),
                         "sex_row": rows, "age_row": rows, "sex_raw": patients["gender"],
                         "age_raw": patients["anchor_age"]})
    admit = parse_dates(admissions["admittime"], adm_path.name, "admittime", date_format)
    discharge = (parse_dates(admissions["dischtime"], adm_path.name, "dischtime", date_format)
                 if "dischtime" in admissions.columns else admit)
    visits = pd.DataFrame({"patient_id": admissions["subject_id"],
                           "visit_id": admissions["hadm_id"], "order": admit, "start": admit,
                           "end": discharge, "row": np.arange(len(admissions))})
    unknown = (~visits["patient_id"].isin(demo["subject_id"])).to_numpy()
    drops.add_rows("admission of a patient missing from patients", adm_path.name, "subject_id",
                   np.flatnonzero(unknown), visits["patient_id"].to_numpy()[unknown])
    visits = visits[~unknown].merge(demo.drop_duplicates("subject_id"), left_on="patient_id",
                                    right_on="subject_id")
    visits["age"] = visits["anchor_age"] + visits["order"].dt.year - visits["anchor_year"]

    version = parse_version(diagnoses["icd_version"], dx_path.name, "icd_version")
    positions = np.arange(len(diagnoses))
    is9 = (version == 9).to_numpy()
    is10 = (version == 10).to_numpy()
    drops.add_rows(ICD10_ROW, dx_path.name, "icd_code", positions[is10],
                   diagnoses["icd_code"].to_numpy()[is10])
    other = ~is9 & ~is10
    drops.add_rows("row whose icd_version is neither 9 nor 10", dx_path.name, "icd_version",
                   positions[other], diagnoses["icd_version"].to_numpy()[other])
    kept = diagnoses[is9].set_axis(positions[is9])
    codes = pd.DataFrame({"visit_id": kept["hadm_id"],
                          "code": normalize_code_column(kept["icd_code"], dx_path.name,
                                                        "icd_code", drops),
                          "row": positions[is9], "column": "icd_code"})
    raw = {"patients": len(patients), "admissions": len(admissions),
           "diagnosis rows": len(diagnoses), "ICD-9 diagnosis rows": int(is9.sum())}
    where = {"visit": (adm_path.name, "hadm_id"), "sex": (pat_path.name, "gender"),
             "age": (pat_path.name, "anchor_age"), "code": dx_path.name}
    return assemble("mimic4", visits, codes, drops, raw, where)
