"""The ICD-9-CM hierarchy: code -> 3-character category (4 for E-codes) -> chapter.

Chapters are the 17 standard chapters plus the V (supplementary factors) and E (external
causes) classifications, by their official ranges. Titles of billable codes come from the CMS
ICD-9-CM v32 list shipped in ``app/icd9/data`` (see PROVENANCE.md there).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from app.icd9.codes import InvalidCodeError, category_of, normalize_code

__all__ = ["CHAPTERS", "Chapter", "CodeInfo", "Hierarchy", "chapter_of", "load_hierarchy"]


@dataclass(frozen=True)
class Chapter:
    """One ICD-9-CM chapter: ``first``/``last`` are the bounding 3-digit (or V/E) categories."""

    index: int
    key: str
    title: str
    first: str
    last: str


# The official chapter ranges of ICD-9-CM (Volume 1 tabular list).
CHAPTERS: tuple[Chapter, ...] = (
    Chapter(0, "001-139", "Infectious and parasitic diseases", "001", "139"),
    Chapter(1, "140-239", "Neoplasms", "140", "239"),
    Chapter(2, "240-279", "Endocrine, nutritional and metabolic diseases, and immunity disorders",
            "240", "279"),
    Chapter(3, "280-289", "Diseases of the blood and blood-forming organs", "280", "289"),
    Chapter(4, "290-319", "Mental disorders", "290", "319"),
    Chapter(5, "320-389", "Diseases of the nervous system and sense organs", "320", "389"),
    Chapter(6, "390-459", "Diseases of the circulatory system", "390", "459"),
    Chapter(7, "460-519", "Diseases of the respiratory system", "460", "519"),
    Chapter(8, "520-579", "Diseases of the digestive system", "520", "579"),
    Chapter(9, "580-629", "Diseases of the genitourinary system", "580", "629"),
    Chapter(10, "630-679", "Complications of pregnancy, childbirth, and the puerperium",
            "630", "679"),
    Chapter(11, "680-709", "Diseases of the skin and subcutaneous tissue", "680", "709"),
    Chapter(12, "710-739", "Diseases of the musculoskeletal system and connective tissue",
            "710", "739"),
    Chapter(13, "740-759", "Congenital anomalies", "740", "759"),
    Chapter(14, "760-779", "Certain conditions originating in the perinatal period", "760", "779"),
    Chapter(15, "780-799", "Symptoms, signs, and ill-defined conditions", "780", "799"),
    Chapter(16, "800-999", "Injury and poisoning", "800", "999"),
    Chapter(17, "V01-V91", "Supplementary classification of factors influencing health status "
            "and contact with health services", "V01", "V91"),
    Chapter(18, "E000-E999", "Supplementary classification of external causes of injury and "
            "poisoning", "E000", "E999"),
)


def chapter_of(code: str) -> Chapter:
    """The chapter of a canonical code; :class:`InvalidCodeError` outside every official range."""
    category = category_of(code)
    head = category[0]
    if head == "V":
        chapter = CHAPTERS[17]
    elif head == "E":
        chapter = CHAPTERS[18]
    else:
        number = int(category)
        chapter = next((c for c in CHAPTERS[:17] if int(c.first) <= number <= int(c.last)), None)
        if chapter is None:
            raise InvalidCodeError(f"{code!r} lies outside every ICD-9-CM chapter")
        return chapter
    if not chapter.first <= category <= chapter.last:
        raise InvalidCodeError(f"{code!r} lies outside every ICD-9-CM chapter")
    return chapter


@dataclass(frozen=True)
class CodeInfo:
    """Everything the service says about one code."""

    code: str
    category: str
    chapter: Chapter
    billable: bool  # in the CMS v32 list of billable codes
    description: str | None  # CMS long title; None where the code is not in the v32 list
    category_description: str | None  # title of the category where it is itself billable


class Hierarchy:
    """Lookup of codes, categories and chapters with CMS v32 titles."""

    def __init__(self, titles: dict[str, tuple[str, str]]) -> None:
        self._titles = titles

    @property
    def billable_codes(self) -> list[str]:
        """Every billable code of the CMS v32 list, in file order."""
        return list(self._titles)

    def lookup(self, raw: str) -> CodeInfo:
        """Describe ``raw`` (any accepted spelling). Raises :class:`InvalidCodeError` if it is not
        ICD-9-CM; a well-formed code missing from the v32 list is described with ``billable=False``.
        """
        code = normalize_code(raw)
        category = category_of(code)
        chapter = chapter_of(code)
        title = self._titles.get(code)
        cat_title = self._titles.get(category)
        return CodeInfo(
            code=code,
            category=category,
            chapter=chapter,
            billable=title is not None,
            description=title[0] if title else None,
            category_description=cat_title[0] if cat_title else None,
        )

    def short_title(self, code: str) -> str | None:
        """CMS short title of a canonical billable code."""
        title = self._titles.get(code)
        return title[1] if title else None


def _read_titles() -> dict[str, tuple[str, str]]:
    text = (resources.files("app.icd9") / "data" / "CMS32_DESC_LONG_SHORT_DX.txt").read_bytes()
    titles: dict[str, tuple[str, str]] = {}
    for line in text.decode("latin-1").splitlines()[1:]:
        if not line.strip():
            continue
        code, long_title, short_title = (field.strip().strip('"') for field in line.split("|"))
        titles[code] = (long_title, short_title)
    return titles


@lru_cache(maxsize=1)
def load_hierarchy() -> Hierarchy:
    """The process-wide hierarchy (reads the shipped CMS table once)."""
    return Hierarchy(_read_titles())
