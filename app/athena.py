"""ICD-9-CM -> OMOP concept ids from an OHDSI Athena vocabulary download.

Athena (athena.ohdsi.org) ships the standardized vocabularies as tab-separated files with a
header row. Two are read here, streamed row by row (the full download is gigabytes; only the
ICD9CM rows and their "Maps to" links are kept, a few MB):

* ``CONCEPT.csv``: ``concept_id``, ``vocabulary_id``, ``concept_code`` (dotted ICD-9-CM, e.g.
  ``250.00``) and ``invalid_reason`` are used;
* ``CONCEPT_RELATIONSHIP.csv``: ``concept_id_1``, ``concept_id_2``, ``relationship_id`` and
  ``invalid_reason`` are used.

A code's *source* concept is its ``ICD9CM`` concept; its *standard* concept is the target of the
source concept's valid ``Maps to`` relationship (the lowest target id where Athena lists several,
so the mapping is deterministic). Codes Athena does not know map to 0, as the CDM conventions
allow. A missing file or column raises :class:`AthenaError` naming it.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from app.icd9.codes import try_normalize_code

__all__ = ["CONCEPT_COLUMNS", "RELATIONSHIP_COLUMNS", "AthenaError", "ConceptMap",
           "load_athena"]

CONCEPT_COLUMNS = ("concept_id", "vocabulary_id", "concept_code", "invalid_reason")
RELATIONSHIP_COLUMNS = ("concept_id_1", "concept_id_2", "relationship_id", "invalid_reason")


class AthenaError(ValueError):
    """An Athena vocabulary folder that cannot be used; the message names file and column."""


@dataclass(frozen=True)
class ConceptMap:
    """Canonical ICD-9-CM code -> (source concept id, standard concept id); 0 where unknown."""

    source: dict[str, int] = field(default_factory=dict)
    standard: dict[str, int] = field(default_factory=dict)
    folder: str = ""

    def source_id(self, code: str) -> int:
        return self.source.get(code, 0)

    def standard_id(self, code: str) -> int:
        return self.standard.get(code, 0)


def _rows(path: Path, columns: tuple[str, ...]):
    """``(row number, {column: value})`` of a tab-separated Athena file, header checked."""
    if not path.is_file():
        raise AthenaError(f"Athena vocabulary: file {path} is missing (download the "
                          f"vocabularies from athena.ohdsi.org and unzip them there)")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise AthenaError(f"Athena vocabulary: {path} has no column "
                              f"{', '.join(missing)} (header: {', '.join(header) or 'empty'})")
        index = [header.index(c) for c in columns]
        width = max(index)
        for number, row in enumerate(reader, start=2):
            if len(row) <= width:
                raise AthenaError(f"Athena vocabulary: {path} line {number} has {len(row)} "
                                  f"fields, expected {len(header)}")
            yield number, [row[i] for i in index]


def _int(path: Path, number: int, column: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AthenaError(f"Athena vocabulary: {path} line {number} column {column}: "
                          f"{value!r} is not an integer") from None


def load_athena(folder: str | Path) -> ConceptMap:
    """The ICD-9-CM concept map of an Athena folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AthenaError(f"Athena vocabulary: {folder} is not a folder")
    concept_path = folder / "CONCEPT.csv"
    relationship_path = folder / "CONCEPT_RELATIONSHIP.csv"
    # Both files are checked before the long read, so a bad folder fails fast.
    for path, columns in ((concept_path, CONCEPT_COLUMNS),
                          (relationship_path, RELATIONSHIP_COLUMNS)):
        next(_rows(path, columns), None)
    source: dict[str, int] = {}
    for number, (cid, vocabulary, code, invalid) in _rows(concept_path, CONCEPT_COLUMNS):
        if vocabulary != "ICD9CM" or invalid.strip():
            continue
        canonical = try_normalize_code(code)
        if canonical is not None:
            source[canonical] = _int(concept_path, number, "concept_id", cid)
    by_source = {cid: code for code, cid in source.items()}
    standard: dict[str, int] = {}
    for number, (one, two, relationship, invalid) in _rows(relationship_path,
                                                           RELATIONSHIP_COLUMNS):
        if relationship != "Maps to" or invalid.strip():
            continue
        code = by_source.get(_int(relationship_path, number, "concept_id_1", one))
        if code is None:
            continue
        target = _int(relationship_path, number, "concept_id_2", two)
        if code not in standard or target < standard[code]:
            standard[code] = target
    return ConceptMap(source, standard, str(folder))
