"""CMS Data Entrepreneurs' Synthetic Public Use File (DE-SynPUF) loader.

A folder holding any of the published files, as released (``.zip`` with one CSV inside) or
unpacked (``.csv``, ``.csv.gz``, ``.parquet``), names matched case-insensitively:

- Beneficiary Summary files (``*Beneficiary_Summary_File*``, one per year): ``DESYNPUF_ID``,
  ``BENE_BIRTH_DT``, ``BENE_SEX_IDENT_CD`` (``1`` male, ``2`` female; anything else drops the
  patient). A beneficiary is in every year's file; the record of the file first in name order
  (the earliest year) is used.
- Inpatient, Outpatient and Carrier claims files (``*Inpatient_Claims*``,
  ``*Outpatient_Claims*``, ``*Carrier_Claims*``): ``DESYNPUF_ID``, ``CLM_ID``, ``CLM_FROM_DT``,
  ``CLM_THRU_DT`` and the ICD-9 diagnosis columns ``ADMTNG_ICD9_DGNS_CD``, ``ICD9_DGNS_CD_<n>``
  and ``LINE_ICD9_DGNS_CD_<n>`` (whichever the file has). Procedure and HCPCS columns are not read.

**One visit per claim** (an inpatient claim's segments are one claim), ordered by the parsed
``CLM_FROM_DT`` (ties: inpatient, outpatient, carrier, then file order); its visit time is
``CLM_FROM_DT`` to ``CLM_THRU_DT``. Age is ``CLM_FROM_DT - BENE_BIRTH_DT`` at the first claim.
Dates are ``YYYYMMDD`` as the layout specifies (``date_format`` overrides it). Empty diagnosis
columns are unused slots, not drops; a claim without any valid code is a dropped visit.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from app.corpus import Corpus, DropLog, describe_row
from training.loaders.common import (
    CHUNK_ROWS,
    DataError,
    assemble,
    normalize_code_column,
    parse_dates,
    read_table,
    read_table_chunks,
)

SYNPUF_DATE_FORMAT = "%Y%m%d"
SECONDS_PER_YEAR = 365.2425 * 24 * 3600
SUFFIXES = (".csv", ".csv.gz", ".zip", ".csv.zip", ".parquet")
CLAIM_KINDS = ("inpatient", "outpatient", "carrier")
_DIAGNOSIS = re.compile(r"^(?:admtng_icd9_dgns_cd|icd9_dgns_cd_\d+|line_icd9_dgns_cd_\d+)$")
_SEX = {"1": "M", "2": "F"}


CLAIM_COLUMNS = ["desynpuf_id", "clm_id", "clm_from_dt", "clm_thru_dt"]
# Claim keys: kind * 10^16 + CLM_ID where CLM_ID is a number below 10^16 (as in the released
# files), which keeps millions of claims as int64 rather than strings; else a text key.
_KIND_STRIDE = 10**16


def _is_diagnosis(column: str) -> bool:
    return _DIAGNOSIS.match(column) is not None


def _claim_keys(clm_id: pd.Series, patient: pd.Series, kind: str, kind_index: int) -> pd.Series:
    number = pd.to_numeric(clm_id, errors="coerce")
    numeric = number.notna().all() and bool((number >= 0).all() & (number < _KIND_STRIDE).all())
    if numeric and (number == number.round()).all():
        return number.astype("int64") + kind_index * _KIND_STRIDE
    return (patient + "\x1f" + kind + " claim " + clm_id.astype("string")).astype(object)


def _claim_chunk(claims: pd.DataFrame, kind: str, kind_index: int, file: str, fmt: str,
                 drops: DropLog) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One chunk of a claims file reduced to its visits (one row per claim row) and codes."""
    columns = [c for c in claims.columns if _is_diagnosis(c)]
    if not columns:
        raise DataError(file, "no ICD-9 diagnosis column (ADMTNG_ICD9_DGNS_CD, "
                              "ICD9_DGNS_CD_<n> or LINE_ICD9_DGNS_CD_<n>)")
    patient = claims["desynpuf_id"].astype("string").str.strip()
    visit_id = _claim_keys(claims["clm_id"].astype("string").str.strip(), patient, kind,
                           kind_index)
    rows = claims.index.to_numpy()
    visits = pd.DataFrame({"patient_id": patient.to_numpy(), "visit_id": visit_id.to_numpy(),
                           "start": parse_dates(claims["clm_from_dt"], file, "clm_from_dt", fmt),
                           "end": parse_dates(claims["clm_thru_dt"], file, "clm_thru_dt", fmt),
                           "row": rows})
    visits["file"] = pd.Categorical([file] * len(visits))
    parts = []
    for rank, column in enumerate(columns):
        values = claims[column]
        present = (values.notna() & (values.str.strip() != "")).to_numpy()
        codes = normalize_code_column(values[present], file, column, drops, count_missing=False)
        parts.append(pd.DataFrame({"visit_id": visit_id.to_numpy()[present],
                                   "code": codes.to_numpy(), "row": rows[present],
                                   "rank": rank, "column": column}))
    # A claim's codes in the order the file lists them: row by row, column by column.
    codes = pd.concat(parts, ignore_index=True).sort_values(["row", "rank"], kind="stable")
    codes = codes.drop(columns="rank").dropna(subset=["code"])
    codes["column"] = codes["column"].astype("category")
    codes["file"] = pd.Categorical([file] * len(codes))
    return visits, codes


def _files(folder: Path, marker: str) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if marker in p.name.lower() and p.name.lower().endswith(SUFFIXES))


def load_synpuf(folder: str | Path, date_format: str | None = None) -> Corpus:
    """Load a DE-SynPUF folder into a corpus (layout and rules: see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "no such folder")
    fmt = date_format or SYNPUF_DATE_FORMAT
    drops = DropLog()
    bene_files = _files(folder, "beneficiary_summary")
    claim_files = [(kind, path) for kind in CLAIM_KINDS
                   for path in _files(folder, f"{kind}_claims")]
    if not bene_files or not claim_files:
        raise DataError(folder, "a DE-SynPUF folder needs at least one *Beneficiary_Summary_File*"
                                " and one *Inpatient_Claims*, *Outpatient_Claims* or "
                                "*Carrier_Claims* file (.zip, .csv, .csv.gz or .parquet)")

    demo_parts = []
    for path in bene_files:
        bene = read_table(path, ["desynpuf_id", "bene_birth_dt", "bene_sex_ident_cd"],
                          usecols=lambda c: False)
        sex_raw = bene["bene_sex_ident_cd"].astype("string").str.strip()
        demo_parts.append(pd.DataFrame({
            "patient_id": bene["desynpuf_id"].astype("string").str.strip(),
            "birth": parse_dates(bene["bene_birth_dt"], path.name, "bene_birth_dt", fmt),
            "sex": sex_raw.map(_SEX).astype("string"), "sex_raw": sex_raw,
            "age_raw": bene["bene_birth_dt"], "sex_row": np.arange(len(bene)),
            "sex_file": path.name}))
    demo = pd.concat(demo_parts, ignore_index=True).drop_duplicates("patient_id")
    demo["age_row"], demo["age_file"] = demo["sex_row"], demo["sex_file"]

    visit_parts, code_parts = [], []
    raw: dict[str, int] = {"beneficiaries": len(demo)}
    for kind_index, (kind, path) in enumerate(claim_files):
        n_rows = 0
        for claims in read_table_chunks(path, CLAIM_COLUMNS, _is_diagnosis, CHUNK_ROWS):
            visits_part, codes_part = _claim_chunk(claims, kind, kind_index, path.name, fmt,
                                                   drops)
            visit_parts.append(visits_part)
            code_parts.append(codes_part)
            n_rows += len(claims)
        raw[f"{kind} claim rows"] = raw.get(f"{kind} claim rows", 0) + n_rows

    visits = pd.concat(visit_parts, ignore_index=True)
    owners = visits.groupby("visit_id", sort=False)["patient_id"].nunique()
    if (owners > 1).any():
        shared = visits[visits["visit_id"] == owners.index[np.argmax(owners.to_numpy() > 1)]]
        raise DataError(shared["file"].iloc[1], "a CLM_ID belongs to two beneficiaries",
                        row=int(shared["row"].iloc[1]) + 1, column="clm_id")
    # An inpatient claim's segments share a CLM_ID: one visit, spanning all its segments.
    span = visits.groupby("visit_id", sort=False).agg(start=("start", "min"), end=("end", "max"))
    visits = visits.drop(columns=["start", "end"]).drop_duplicates("visit_id")
    visits = visits.join(span, on="visit_id")
    visits["order"] = visits["start"]
    unknown = ~visits["patient_id"].isin(demo["patient_id"]).to_numpy()
    if unknown.any():
        reason = "claim of a beneficiary missing from the Beneficiary Summary files"
        drops.add(reason, int(unknown.sum()))
        for _, rec in visits[unknown].head(drops.max_examples).iterrows():
            drops.example(reason, describe_row(str(rec["file"]), int(rec["row"]) + 1,
                                               "desynpuf_id", rec["patient_id"]))
    visits = visits[~unknown].merge(demo, on="patient_id")
    visits["age"] = (visits["start"] - visits["birth"]).dt.total_seconds() / SECONDS_PER_YEAR
    raw["claims"] = len(visits) + int(unknown.sum())
    codes = pd.concat(code_parts, ignore_index=True)
    # The codes of a claim dropped above are covered by that claim's drop.
    codes = codes[codes["visit_id"].isin(visits["visit_id"])]
    where = {"visit": ("", "clm_id"), "sex": ("", "bene_sex_ident_cd"),
             "age": ("", "bene_birth_dt")}
    return assemble("synpuf", visits, codes, drops, raw, where)
