"""CMS Medicare Code Editor (MCE) v32 age and sex edits for ICD-9-CM diagnosis codes.

Source: CMS "Definitions of Medicare Code Edits" v32 (FY 2015), the last ICD-9-CM release,
shipped as ``app/icd9/data/MCE_Simple_Code_Edits_v32.txt`` (see PROVENANCE.md there). A code
listed under an edit is consistent only with patients inside that edit's age range or sex;
a code under no edit is consistent with everyone.

Supplement (ours, not CMS's): every code of categories V30-V39 (liveborn infants according to
type of birth) is newborn-only (age 0). These codes belong on the newborn's birth record alone:
the ICD-9-CM Tabular List introduces V30-V39 as "intended for the coding of liveborn infants
who are consuming health care", and the ICD-9-CM Official Guidelines for Coding and Reporting
(section I.C.15, newborn guidelines) assign one only on the newborn's record, at birth. MCE v32
lists 27 of the 36 under ``Newborn_Only`` but leaves out the nine ``V3x2`` codes ("born outside
hospital and not hospitalized"), which let a model generate V31.2 for a 70-year-old man.
:data:`NEWBORN_SUPPLEMENT` names the categories; the codes it adds are in
``CodeEdits.supplemented`` and their violations say so.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ["AGE_EDITS", "NEWBORN_SUPPLEMENT", "CodeEdits", "load_edits"]

# MCE age edits: inclusive age ranges in years (MCE v32 definitions).
AGE_EDITS: dict[str, tuple[int, int]] = {
    "Newborn_Only": (0, 0),
    "Pediatric_Only": (0, 17),
    "Maternity_Only": (12, 55),
    "Adult_Only": (15, 124),
}
SEX_EDITS: dict[str, str] = {"Female_Only": "F", "Male_Only": "M"}
# Categories whose every code is newborn-only, beyond the MCE list (see the module docstring).
NEWBORN_SUPPLEMENT: tuple[str, ...] = tuple(f"V3{d}" for d in range(10))


@dataclass(frozen=True)
class CodeEdits:
    """Age range and sex a code is restricted to, as the MCE lists them."""

    age_edits: dict[str, tuple[int, int]]  # code -> inclusive (min_age, max_age)
    sex_edits: dict[str, str]  # code -> "F" or "M"
    supplemented: frozenset[str] = frozenset()  # age edits added by NEWBORN_SUPPLEMENT

    def violation(self, code: str, age: float, sex: str) -> str | None:
        """Why ``code`` is inconsistent with a patient of ``age`` and ``sex``; None if consistent.

        Ages are whole years as MCE counts them (``int(age)``).
        """
        years = int(age)
        span = self.age_edits.get(code)
        if span is not None and not span[0] <= years <= span[1]:
            source = ("newborn-only supplement to the MCE edits" if code in self.supplemented
                      else "MCE age edit")
            return f"{code} is for ages {span[0]}-{span[1]} ({source}), patient is {years}"
        required = self.sex_edits.get(code)
        if required is not None and required != sex:
            return f"{code} is for sex {required} only (MCE sex edit), patient is {sex}"
        return None

    def is_valid(self, code: str, age: float, sex: str) -> bool:
        """True when ``code`` passes the MCE age and sex edits for this patient."""
        return self.violation(code, age, sex) is None


@lru_cache(maxsize=1)
def load_edits() -> CodeEdits:
    """The diagnosis age and sex edits of MCE v32 (read once per process)."""
    path = resources.files("app.icd9") / "data" / "MCE_Simple_Code_Edits_v32.txt"
    age: dict[str, tuple[int, int]] = {}
    sex: dict[str, str] = {}
    with path.open("r", encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if row["ICD_Code_Type"] != "D":
                continue
            kind, code = row["MCE_Edit_Type"], row["ICD_Code"].strip()
            if kind in AGE_EDITS:
                # A code under two age edits keeps their intersection.
                low, high = AGE_EDITS[kind]
                if code in age:
                    low, high = max(low, age[code][0]), min(high, age[code][1])
                age[code] = (low, high)
            elif kind in SEX_EDITS:
                sex[code] = SEX_EDITS[kind]
    from app.icd9.hierarchy import load_hierarchy

    added = set()
    for code in load_hierarchy().billable_codes:
        if code[:3] in NEWBORN_SUPPLEMENT and code not in age:
            age[code] = AGE_EDITS["Newborn_Only"]
            added.add(code)
    return CodeEdits(age_edits=age, sex_edits=sex, supplemented=frozenset(added))
