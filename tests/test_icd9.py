"""ICD-9-CM code syntax, hierarchy and MCE edits."""

from __future__ import annotations

import itertools

import pytest

from app.icd9.codes import InvalidCodeError, category_of, normalize_code, try_normalize_code
from app.icd9.edits import load_edits
from app.icd9.hierarchy import CHAPTERS, chapter_of, load_hierarchy


@pytest.mark.parametrize(("raw", "expected"), [
    ("250.00", "25000"), ("25000", "25000"), ("8", "008"), ("8.5", "0085"), ("42", "042"),
    ("v57.1", "V571"), ("V57", "V57"), ("V3000", "V3000"), ("E909", "E909"),
    ("E849.7", "E8497"), (" 401.9 ", "4019"), ("038.9", "0389"),
    # a dot anywhere else is punctuation (issue 15): the rest must be a canonical code
    ("E87.82", "E8782"), ("E8782", "E8782"), ("E878.2", "E8782"), ("25.000", "25000"),
    ("E87.0", "E870"),
])
def test_normalize_code_accepts_every_spelling(raw: str, expected: str) -> None:
    assert normalize_code(raw) == expected


@pytest.mark.parametrize("raw", ["ABC", "I10", "S73.00", "", "?", "250.000", "12345678",
                                 None, "R51",
                                 "\uff12\uff15\uff10",  # fullwidth 250
                                 "\u0664\u0660\u0661\u0669",  # Arabic-Indic 4019
                                 "4\u0660\u06619", "V\uff15\uff17"])
def test_normalize_code_rejects_non_icd9(raw: object) -> None:
    with pytest.raises(InvalidCodeError):
        normalize_code(raw)
    assert try_normalize_code(raw) is None


def test_category_of_uses_four_characters_for_e_codes() -> None:
    assert category_of("25000") == "250"
    assert category_of("V3000") == "V30"
    assert category_of("E8497") == "E849"


@pytest.mark.parametrize(("code", "key"), [
    ("0010", "001-139"), ("1390", "001-139"), ("1400", "140-239"), ("25000", "240-279"),
    ("2800", "280-289"), ("29000", "290-319"), ("3200", "320-389"), ("4019", "390-459"),
    ("4660", "460-519"), ("5200", "520-579"), ("5990", "580-629"), ("650", "630-679"),
    ("6800", "680-709"), ("7100", "710-739"), ("7400", "740-759"), ("7700", "760-779"),
    ("7800", "780-799"), ("99591", "800-999"), ("V3000", "V01-V91"), ("E8497", "E000-E999"),
])
def test_chapter_ranges_are_the_official_ones(code: str, key: str) -> None:
    assert chapter_of(code).key == key


def test_nineteen_chapters_cover_the_numeric_range_without_gaps() -> None:
    assert len(CHAPTERS) == 19
    numeric = CHAPTERS[:17]
    assert numeric[0].first == "001" and numeric[-1].last == "999"
    for before, after in itertools.pairwise(numeric):
        assert int(before.last) + 1 == int(after.first)


def test_hierarchy_describes_every_billable_cms_code() -> None:
    hierarchy = load_hierarchy()
    codes = hierarchy.billable_codes
    assert len(codes) == 14_567
    for code in codes:
        info = hierarchy.lookup(code)
        assert info.billable and info.description
    assert hierarchy.lookup("386.01").description.startswith("Active M")  # Ménière, Latin-1


def test_unknown_but_well_formed_code_is_reported_not_crashed_on() -> None:
    info = load_hierarchy().lookup("250")  # a category, not a billable code
    assert not info.billable and info.description is None
    assert info.chapter.key == "240-279"
    with pytest.raises(InvalidCodeError, match="not an ICD-9-CM code"):
        load_hierarchy().lookup("ABC")
    with pytest.raises(InvalidCodeError, match="outside every ICD-9-CM chapter"):
        load_hierarchy().lookup("000")


def test_mce_edit_counts_match_the_cms_tables() -> None:
    edits = load_edits()
    assert sum(1 for sex in edits.sex_edits.values() if sex == "F") == 1_556
    assert sum(1 for sex in edits.sex_edits.values() if sex == "M") == 154


def test_mce_edits_catch_pregnancy_in_men_and_newborn_codes_in_adults() -> None:
    edits = load_edits()
    assert not edits.is_valid("64800", age=30, sex="M")  # maternity, female only
    assert edits.is_valid("64800", age=30, sex="F")
    assert not edits.is_valid("64800", age=70, sex="F")  # maternity age edit 12-55
    assert "age" in edits.violation("V3000", age=40, sex="F")  # newborn only
    assert edits.is_valid("V3000", age=0, sex="F")
    assert not edits.is_valid("185", age=60, sex="F")  # prostate cancer, male only
    assert edits.is_valid("4019", age=60, sex="M")
