"""The one corpus type every source is loaded into, with its drop log and summary statistics.

A patient is ``{patient_id, age, sex, visits}``: age in years at the first visit (capped at
90), sex ``"F"`` or ``"M"``, visits in time order, each visit a duplicate-free tuple of canonical
ICD-9-CM codes (see :mod:`app.icd9.codes`), and, where the source has them, each visit's
``(start, end)`` in days since the first visit.

Rows in drop examples and load errors are **1-based data rows, the header excluded**: data row
1 is the first row under the header, which in a CSV file is line 2 (shown too, for CSV files).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

__all__ = [
    "AGE_CAP",
    "SEXES",
    "SEX_IDS",
    "Corpus",
    "CorpusStats",
    "DropLog",
    "LengthStats",
    "Patient",
    "Sex",
    "corpus_stats",
    "describe_row",
    "length_stats",
    "token_length",
]

AGE_CAP = 90.0
Sex = Literal["F", "M"]  # a patient's sex (the HTTP schemas' too)
SEXES: tuple[str, ...] = get_args(Sex)
# The sex encoding every model input uses (model, training batches, decoding masks, the
# retrieval index): the position in SEXES, 0 = F, 1 = M.
SEX_IDS: dict[str, int] = {sex: i for i, sex in enumerate(SEXES)}


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
        """JSON-ready form; ``visit_times`` appears only where the source had visit times, so
        patients without them serialise exactly as before."""
        out = {
            "patient_id": self.patient_id,
            "age": self.age,
            "sex": self.sex,
            "visits": [list(v) for v in self.visits],
        }
        if self.visit_times is not None:
            out["visit_times"] = [list(t) for t in self.visit_times]
        return out


def describe_row(file: str, row: int, column: str | None = None, value: object = None) -> str:
    """Where a value sits, for drop examples and errors: ``row`` is its 1-based data row (header
    excluded); CSV files also get the file line (data row + 1, exact unless a quoted field spans
    lines)."""
    text = f"{file} data row {row}"
    if ".csv" in file.lower():
        text += f" (line {row + 1})"
    if column is not None:
        text += f", column {column}"
    if value is not None:
        # pandas' NA is matched by type name: the serving side does not import pandas.
        empty = (type(value).__name__ == "NAType" or value == ""
                 or (isinstance(value, float) and np.isnan(value)))
        text += ", value empty" if empty else f", value {str(value)!r}"
    return text


@dataclass
class DropLog:
    """Counts of dropped rows, codes, visits or patients by reason, with the first few examples
    of each.

    An example names the file, the 1-based data row (header excluded; see the module doc), the
    column and the value, so a user can find the offending value. Each reason has a level:
    ``"patient"`` for reasons that drop whole patients (these decide whether a load dropped too
    much), else ``"row"``.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    levels: dict[str, str] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, count: int = 1, where: str | None = None,
            level: str | None = None) -> None:
        """Count ``count`` drops for ``reason``; ``where`` is an example, ``level`` see above."""
        if count <= 0:
            return
        self.counts[reason] += count
        self.levels.setdefault(reason, level or "row")
        if where is not None:
            self.example(reason, where)

    def example(self, reason: str, where: str) -> None:
        """Keep ``where`` as an example of ``reason`` unless it has enough already."""
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < self.max_examples:
            bucket.append(where)

    def add_rows(self, reason: str, file: str, column: str, rows: np.ndarray,
                 values: np.ndarray | None = None) -> None:
        """Record dropped rows given their 0-based positions in a file's data rows."""
        rows = np.asarray(rows)
        if rows.size == 0:
            return
        self.add(reason, int(rows.size))
        for i in range(min(self.max_examples, rows.size)):
            self.example(reason, describe_row(file, int(rows[i]) + 1, column,
                                              None if values is None else values[i]))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def patients_dropped(self) -> int:
        """Patients dropped whole (reasons of level ``"patient"``)."""
        return sum(n for r, n in self.counts.items() if self.levels.get(r) == "patient")


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


def token_length(patient: Patient) -> int:
    """Tokens of a patient's visit sequence ``<s> (<v> code+ </v>)+ </s>``: 2 + sum over visits
    of (codes + 2)."""
    return 2 + sum(len(v) + 2 for v in patient.visits)


LENGTH_PERCENTILES = (50, 90, 99, 99.9)


@dataclass(frozen=True)
class LengthStats:
    """How long patients are, for choosing (and checking) the model's maximum length."""

    max_positions: int
    token_percentiles: dict[str, int]  # "p50", "p90", "p99", "p99.9", "max"
    over_limit: int  # patients longer than max_positions tokens
    visits_over_limit: int  # visits of those patients
    visit_percentiles: dict[str, int]  # visits per patient: "p50", "p90", "p99", "p99.9", "max"
    visit_histogram: dict[str, int]  # patients by visit count: "1", "2", "3-5", ...
    # the windows of consecutive visits those patients are trained on (app.windows; every
    # visit kept), and whether max_positions is the training recipe's choice
    windows_over_limit: int = 0
    recipe_positions: bool = False


VISIT_BINS = ((1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, None))


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if values.size == 0:
        return {f"p{q}": 0 for q in LENGTH_PERCENTILES} | {"max": 0}
    # "higher": a percentile is a length some patient really has, never an interpolation.
    out = {f"p{q}": int(np.percentile(values, q, method="higher")) for q in LENGTH_PERCENTILES}
    return out | {"max": int(values.max())}


def length_stats(patients: list[Patient], max_positions: int | None = None) -> LengthStats:
    """Token-length percentiles (:func:`token_length`), how many patients (and their visits)
    exceed ``max_positions`` and into how many windows the long-patient rule splits them
    (:mod:`app.windows`), and the visits-per-patient distribution.

    ``max_positions`` None: the training recipe's (:func:`app.windows.positions_for` of these
    patients' 99.9th percentile; the recipe itself measures the training split).
    """
    from app.windows import positions_for, window_bounds

    lengths = np.array([token_length(p) for p in patients], dtype=np.int64)
    recipe = max_positions is None
    if max_positions is None:
        max_positions = positions_for(float(np.percentile(lengths, 99.9)) if lengths.size else 0)
    if max_positions < 1:
        raise ValueError(f"max_positions must be at least 1, got {max_positions}")
    n_visits = np.array([len(p.visits) for p in patients], dtype=np.int64)
    over = lengths > max_positions
    windows = 0
    if max_positions >= 5:
        for i in np.flatnonzero(over):
            sizes = [min(len(v), max_positions - 4) for v in patients[i].visits]
            windows += len(window_bounds(sizes, max_positions))
    histogram = {}
    for low, high in VISIT_BINS:
        label = str(low) if high == low else (f"{low}+" if high is None else f"{low}-{high}")
        upper = np.iinfo(np.int64).max if high is None else high
        histogram[label] = int(((n_visits >= low) & (n_visits <= upper)).sum())
    return LengthStats(max_positions=max_positions, token_percentiles=_percentiles(lengths),
                       over_limit=int(over.sum()), visits_over_limit=int(n_visits[over].sum()),
                       visit_percentiles=_percentiles(n_visits), visit_histogram=histogram,
                       windows_over_limit=windows, recipe_positions=recipe)
