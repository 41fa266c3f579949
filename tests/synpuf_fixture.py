"""A small DE-SynPUF folder written from the published file layout (CMS DE-SynPUF codebook:
column names and order of the Beneficiary Summary, Inpatient, Outpatient and Carrier claims
files; dates ``YYYYMMDD``; sex ``1`` male, ``2`` female). The values are made up to exercise
every rule of :mod:`training.loaders.synpuf`; ``EXPECTED`` says what a correct load gives.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

SP = ["SP_ALZHDMTA", "SP_CHF", "SP_CHRNKIDN", "SP_CNCR", "SP_COPD", "SP_DEPRESSN", "SP_DIABETES",
      "SP_ISCHMCHT", "SP_OSTEOPRS", "SP_RA_OA", "SP_STRKETIA"]
BENEFICIARY = (["DESYNPUF_ID", "BENE_BIRTH_DT", "BENE_DEATH_DT", "BENE_SEX_IDENT_CD",
                "BENE_RACE_CD", "BENE_ESRD_IND", "SP_STATE_CODE", "BENE_COUNTY_CD",
                "BENE_HI_CVRAGE_TOT_MONS", "BENE_SMI_CVRAGE_TOT_MONS",
                "BENE_HMO_CVRAGE_TOT_MONS", "PLAN_CVRG_MOS_NUM"] + SP
               + [f"{a}_{b}" for b in ("IP", "OP", "CAR")
                  for a in ("MEDREIMB", "BENRES", "PPPYMT")])
HCPCS45 = [f"HCPCS_CD_{i}" for i in range(1, 46)]
DGNS10 = [f"ICD9_DGNS_CD_{i}" for i in range(1, 11)]
PRCDR6 = [f"ICD9_PRCDR_CD_{i}" for i in range(1, 7)]
INPATIENT = (["DESYNPUF_ID", "CLM_ID", "SEGMENT", "CLM_FROM_DT", "CLM_THRU_DT", "PRVDR_NUM",
              "CLM_PMT_AMT", "NCH_PRMRY_PYR_CLM_PD_AMT", "AT_PHYSN_NPI", "OP_PHYSN_NPI",
              "OT_PHYSN_NPI", "CLM_ADMSN_DT", "ADMTNG_ICD9_DGNS_CD",
              "CLM_PASS_THRU_PER_DIEM_AMT", "NCH_BENE_IP_DDCTBL_AMT",
              "NCH_BENE_PTA_COINSRNC_LBLTY_AM", "NCH_BENE_BLOOD_DDCTBL_LBLTY_AM",
              "CLM_UTLZTN_DAY_CNT", "NCH_BENE_DSCHRG_DT", "CLM_DRG_CD"]
             + DGNS10 + PRCDR6 + HCPCS45)
OUTPATIENT = (["DESYNPUF_ID", "CLM_ID", "SEGMENT", "CLM_FROM_DT", "CLM_THRU_DT", "PRVDR_NUM",
               "CLM_PMT_AMT", "NCH_PRMRY_PYR_CLM_PD_AMT", "AT_PHYSN_NPI", "OP_PHYSN_NPI",
               "OT_PHYSN_NPI", "NCH_BENE_BLOOD_DDCTBL_LBLTY_AM"] + DGNS10 + PRCDR6
              + ["NCH_BENE_PTB_DDCTBL_AMT", "NCH_BENE_PTB_COINSRNC_AMT", "ADMTNG_ICD9_DGNS_CD"]
              + HCPCS45)
LINE = ["PRF_PHYSN_NPI", "TAX_NUM", "HCPCS_CD", "LINE_NCH_PMT_AMT", "LINE_BENE_PTB_DDCTBL_AMT",
        "LINE_BENE_PRMRY_PYR_PD_AMT", "LINE_COINSRNC_AMT", "LINE_ALOWD_CHRG_AMT",
        "LINE_PRCSG_IND_CD", "LINE_ICD9_DGNS_CD"]
CARRIER = (["DESYNPUF_ID", "CLM_ID", "CLM_FROM_DT", "CLM_THRU_DT"]
           + [f"ICD9_DGNS_CD_{i}" for i in range(1, 9)]
           + [f"{name}_{i}" for name in LINE for i in range(1, 14)])

# (id, birth, sex) per year's file: A's 2009 record disagrees on sex (the 2008 one is used),
# C has sex 3 (dropped), D has no birth date (dropped), E appears only in 2009.
BENES = {
    "DE1_0_2008_Beneficiary_Summary_File_Sample_1.csv": [
        ("00000A", "19400115", "2"), ("00000B", "19300301", "1"), ("00000C", "19500101", "3"),
        ("00000D", "", "1")],
    "DE1_0_2009_Beneficiary_Summary_File_Sample_1.csv": [
        ("00000A", "19400115", "1"), ("00000E", "19450505", "1")],
}
# (id, claim, segment, from, thru, {column: code})
INPATIENT_ROWS = [
    ("00000A", "100", "1", "20090310", "20090315",
     {"ADMTNG_ICD9_DGNS_CD": "78650", "ICD9_DGNS_CD_1": "41401", "ICD9_DGNS_CD_2": "4019"}),
    ("00000A", "100", "2", "20090316", "20090320", {"ICD9_DGNS_CD_1": "25000"}),
]
OUTPATIENT_ROWS = [
    ("00000A", "200", "1", "20080105", "20080105",
     {"ICD9_DGNS_CD_1": "V5869", "ICD9_DGNS_CD_2": "4019", "ICD9_DGNS_CD_3": "4019"}),
    ("00000B", "201", "1", "20100101", "20100101", {"ICD9_DGNS_CD_1": "OTHER"}),
    ("00000B", "202", "1", "20081231", "20081231", {"ICD9_DGNS_CD_1": "4280"}),
]
CARRIER_ROWS = [
    ("00000A", "300", "", "20080105", "20080105",
     {"ICD9_DGNS_CD_1": "4011", "ICD9_DGNS_CD_2": "E87.82", "LINE_ICD9_DGNS_CD_1": "4011"}),
    ("00000C", "301", "", "20080301", "20080301", {"ICD9_DGNS_CD_1": "4019"}),
    ("00000Z", "302", "", "20080301", "20080301", {"ICD9_DGNS_CD_1": "4019"}),
    ("00000E", "303", "", "20091201", "20091130", {"ICD9_DGNS_CD_1": "71590"}),
    ("00000D", "304", "", "20080601", "20080601", {"ICD9_DGNS_CD_1": "4019"}),
]
INPATIENT_FILE = "DE1_0_2008_to_2010_Inpatient_Claims_Sample_1.csv"
OUTPATIENT_FILE = "DE1_0_2008_to_2010_Outpatient_Claims_Sample_1.csv.gz"
CARRIER_FILE = "DE1_0_2008_to_2010_Carrier_Claims_Sample_1A.zip"  # as released: a zipped CSV

EXPECTED = {
    # patient: (sex, visits in order, visit_times)
    "00000A": ("F", (("V5869", "4019"), ("4011", "E8782"), ("78650", "41401", "4019", "25000")),
               ((0.0, 0.0), (0.0, 0.0), (430.0, 440.0))),
    "00000B": ("M", (("4280",),), ((0.0, 0.0),)),
    "00000E": ("M", (("71590",),), ((0.0, 0.0),)),
}
EXPECTED_DROPS = {
    "patient with unknown sex": 1, "patient with missing or negative age": 1,
    "duplicate code within a visit": 2, "not an ICD-9-CM code": 1,
    "visit without a valid code": 1,
    "claim of a beneficiary missing from the Beneficiary Summary files": 1,
    "visit end before its start (end set to the start)": 1,
}


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _claims(rows, segment: bool) -> list[dict[str, str]]:
    out = []
    for pid, claim, seg, start, end, codes in rows:
        row = {"DESYNPUF_ID": pid, "CLM_ID": claim, "CLM_FROM_DT": start, "CLM_THRU_DT": end,
               **codes}
        if segment:  # inpatient and outpatient claims carry a segment and a payment
            row["SEGMENT"], row["CLM_PMT_AMT"] = seg, "50.00"
        out.append(row)
    return out


def write_synpuf(folder: Path) -> Path:
    """Write the fixture into ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, benes in BENES.items():
        _write_csv(folder / name, BENEFICIARY,
                   [{"DESYNPUF_ID": i, "BENE_BIRTH_DT": b, "BENE_SEX_IDENT_CD": s,
                     "BENE_RACE_CD": "1", "SP_STATE_CODE": "10"} for i, b, s in benes])
    _write_csv(folder / INPATIENT_FILE, INPATIENT, _claims(INPATIENT_ROWS, True))
    _write_csv(folder / OUTPATIENT_FILE, OUTPATIENT, _claims(OUTPATIENT_ROWS, True))
    inner = folder / CARRIER_FILE.replace(".zip", ".csv")
    _write_csv(inner, CARRIER, _claims(CARRIER_ROWS, False))
    with zipfile.ZipFile(folder / CARRIER_FILE, "w") as archive:
        archive.write(inner, inner.name)
    inner.unlink()
    return folder
