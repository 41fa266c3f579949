"""The one corpus type every source is loaded into, with its drop log and summary statistics.

A patient is ``{patient_id, age, sex, visits}``: age in years at the first visit (capped at
90), sex ``"F"`` or ``"M"``, visits in time order, each visit a duplicate-free tuple of canonical
ICD-9-CM codes (see :mod:`app.icd9.codes`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AGE_CAP", "Patient", "DropLog", "Corpus", "CorpusStats", "corpus_stats"]

AGE_CAP = 90.0
SEXES = ("F", "M")


@dataclass(frozen=True)
class Patient:
    """One patient: demographics and visits of canonical codes (each visit duplicate-free)."""

    patient_id: str
    age: float
    sex: str
    visits: tuple[tuple[str, ...], ...]
    # Per visit (start, end) in days since the first visit's start (first start 0.0); None where
    # the source has no visit times. end >= start.
    visit_times: tuple[tuple[float, float], ...] | None = None

    @property
    def n_codes(self) -> int:
        return sum(len(v) for v in self.visits)

    def to_dict(self) -> dict:
        return {
            "patient_id": self.patient_id,
            "age": self.age,
            "sex": self.sex,
            "visits": [list(v) for v in self.visits],
        }


@dataclass
class DropLog:
    """Counts of dropped rows (or patients) by reason, with the first few examples of each.

    An example names the file, the 1-based data row (header excluded) and the column, so a
    user can find the offending value.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, count: int = 1, where: str | None = None) -> None:
        if count <= 0:
            return
        self.counts[reason] += count
        if where is not None:
            bucket = self.examples.setdefault(reason, [])
            if len(bucket) < self.max_examples:
                bucket.append(where)

    def add_rows(self, reason: str, file: str, column: str, rows: np.ndarray,
                 values: np.ndarray | None = None) -> None:
        """Record dropped rows given their 0-based positions in a file's data rows."""
        rows = np.asarray(rows)
        if rows.size == 0:
            return
        self.counts[reason] += int(rows.size)
        bucket = self.examples.setdefault(reason, [])
        for i in range(min(self.max_examples - len(bucket), rows.size)):
            shown = "" if values is None else f" value {values[i]!r}"
            bucket.append(f"{file} row {int(rows[i]) + 1} column {column}{shown}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Corpus:
    """Patients from one source, the source's name and raw counts, and what was dropped."""

    source: str
    patients: list[Patient]
    drops: DropLog = field(default_factory=DropLog)
    raw_counts: dict[str, int] = field(default_factory=dict)  # rows/entities read per file

    def __len__(self) -> int:
        return len(self.patients)


@dataclass(frozen=True)
class CorpusStats:
    patients: int
    visits: int
    codes: int  # code occurrences
    distinct_codes: int
    mean_codes_per_visit: float
    max_codes_per_visit: int
    mean_visits_per_patient: float
    age_mean: float
    age_bins: dict[str, int]
    sex: dict[str, int]


AGE_BINS = ((0, 1), (1, 18), (18, 40), (40, 65), (65, 80), (80, 91))


def corpus_stats(patients: list[Patient]) -> CorpusStats:
    """Summary statistics of a list of patients."""
    visit_sizes = [len(v) for p in patients for v in p.visits]
    distinct = {c for p in patients for v in p.visits for c in v}
    ages = np.array([p.age for p in patients], dtype=float)
    bins = {}
    for low, high in AGE_BINS:
        label = "0" if (low, high) == (0, 1) else f"{low}-{min(high, 91) - 1}"
        bins[label] = int(((ages >= low) & (ages < high)).sum())
    sexes = Counter(p.sex for p in patients)
    return CorpusStats(
        patients=len(patients),
        visits=len(visit_sizes),
        codes=int(sum(visit_sizes)),
        distinct_codes=len(distinct),
        mean_codes_per_visit=float(np.mean(visit_sizes)) if visit_sizes else 0.0,
        max_codes_per_visit=max(visit_sizes, default=0),
        mean_visits_per_patient=len(visit_sizes) / len(patients) if patients else 0.0,
        age_mean=float(ages.mean()) if ages.size else 0.0,
        age_bins=bins,
        sex={s: sexes.get(s, 0) for s in SEXES},
    )
