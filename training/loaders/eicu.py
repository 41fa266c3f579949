"""eICU Collaborative Research Database loader: ``patient`` and ``diagnosis``.

A patient is ``uniquepid``; a visit is a hospital stay (``patienthealthsystemstayid``), whose
ICU stays' diagnoses are pooled. eICU has no absolute dates, so stays are ordered by
``hospitaldischargeyear`` and then by stay id (ids grow with time within the release). Age is
the age at the first stay's first ICU stay (``> 89`` reads as 90).

Visit times: within a hospital stay eICU gives minutes relative to an ICU admission, so a stay's
length is ``hospitaldischargeoffset - hospitaladmitoffset``; between stays it gives only the
discharge year. Patients with one hospital stay (and both offsets) get ``((0, length),)``;
patients with several stays get no visit times, since their spacing is unknown.

``icd9code`` holds "ICD-9, ICD-10" lists such as ``"401.9, I10"``: every ICD-9 entry is kept and
ICD-10 entries are set aside first (by shape, including ``E86.0``, which would otherwise read as
the ICD-9 E-code ``E860``); a row with no ICD-9 entry is counted as dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import Corpus, DropLog
from app.icd9.codes import looks_like_icd10
from training.loaders.common import (
    assemble,
    find_table,
    normalize_code_column,
    normalize_sex,
    read_table,
)


def _age(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip().replace({"> 89": "90"})
    return pd.to_numeric(text, errors="coerce")


def _stay_times(stays: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Start (epoch) and end (epoch + stay length) per row, NaT where unknown (see module doc)."""
    if not {"hospitaladmitoffset", "hospitaldischargeoffset"} <= set(stays.columns):
        nat = np.full(len(stays), np.datetime64("NaT"), dtype="datetime64[s]")
        return nat, nat
    admit = pd.to_numeric(stays["hospitaladmitoffset"], errors="coerce")
    discharge = pd.to_numeric(stays["hospitaldischargeoffset"], errors="coerce")
    minutes = (discharge - admit).to_numpy(dtype=float)
    n_stays = stays.groupby("uniquepid")["patienthealthsystemstayid"].transform("nunique")
    known = np.isfinite(minutes) & (n_stays == 1).to_numpy()
    start = np.where(known, np.datetime64(0, "s"), np.datetime64("NaT"))
    seconds = np.where(known, minutes * 60, 0).astype(np.int64)
    return start.astype("datetime64[s]"), (start.astype("datetime64[s]")
                                          + seconds.astype("timedelta64[s]"))


def load_eicu(folder: str | Path, date_format: str | None = None) -> Corpus:
    """Load an eICU folder into a corpus (eICU has no dates: ``date_format`` must be None)."""
    if date_format is not None:
        raise ValueError("eICU has no date columns; --date-format does not apply")
    folder = Path(folder)
    drops = DropLog()
    pat_path = find_table(folder, "patient")
    dx_path = find_table(folder, "diagnosis")
    stays = read_table(pat_path, ["patientunitstayid", "patienthealthsystemstayid", "uniquepid",
                                  "gender", "age", "hospitaldischargeyear"])
    diagnoses = read_table(dx_path, ["patientunitstayid", "icd9code"])

    unit_order = pd.to_numeric(stays.get("unitvisitnumber", pd.Series(dtype="string")),
                               errors="coerce")
    start, end = _stay_times(stays)
    rows = np.arange(len(stays))
    frame = pd.DataFrame({
        "patient_id": stays["uniquepid"],
        "visit_id": stays["patienthealthsystemstayid"],
        "year": pd.to_numeric(stays["hospitaldischargeyear"], errors="coerce"),
        "stay": pd.to_numeric(stays["patienthealthsystemstayid"], errors="coerce"),
        "unit": unit_order if len(unit_order) == len(stays) else np.nan,
        "age": _age(stays["age"]),
        "sex": normalize_sex(stays["gender"]),
        "start": start, "end": end, "row": rows, "sex_row": rows, "age_row": rows,
        "sex_raw": stays["gender"], "age_raw": stays["age"],
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
    icd10 = present.map(lambda t: looks_like_icd10(t, strict=True)).astype(bool)
    # ICD-10 entries are expected here and not drops: normalise into a scratch log.
    codes = normalize_code_column(present[~icd10], dx_path.name, "icd9code", DropLog())
    has_icd9 = codes.notna().groupby(level=0).any().reindex(diagnoses.index, fill_value=False)
    has_other = (~icd10).groupby(level=0).any().reindex(diagnoses.index, fill_value=False)
    no_icd9 = (~has_icd9 & ~missing_rows).to_numpy()
    values = diagnoses["icd9code"].to_numpy()
    only10 = no_icd9 & ~has_other.to_numpy()
    drops.add_rows("row with only ICD-10-CM codes (ICD-10-CM is not modelled)", dx_path.name,
                   "icd9code", positions[only10], values[only10])
    drops.add_rows("row without an ICD-9 code", dx_path.name, "icd9code",
                   positions[no_icd9 & ~only10], values[no_icd9 & ~only10])
    codes = codes.dropna()
    unit_ids = diagnoses["patientunitstayid"].loc[codes.index]
    code_frame = pd.DataFrame({"visit_id": unit_ids.map(unit_to_visit).to_numpy(),
                               "code": codes.to_numpy(), "row": codes.index.to_numpy(),
                               "column": "icd9code"})
    unknown = code_frame["visit_id"].isna().to_numpy()
    drops.add_rows("diagnosis of an unknown ICU stay", dx_path.name, "patientunitstayid",
                   code_frame["row"].to_numpy()[unknown], unit_ids.to_numpy()[unknown])
    raw = {"patients": int(stays["uniquepid"].nunique()),
           "hospital stays": int(stays["patienthealthsystemstayid"].nunique()),
           "ICU stays": len(stays), "diagnosis rows": len(diagnoses)}
    where = {"visit": (pat_path.name, "patienthealthsystemstayid"),
             "sex": (pat_path.name, "gender"), "age": (pat_path.name, "age"),
             "code": dx_path.name}
    return assemble("eicu", visits, code_frame[~unknown], drops, raw, where)
