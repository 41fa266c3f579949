"""Dated visits: the training split's visit intervals and the seeded scheme that dates a
generated patient.

**Reference statistics** (:func:`interval_stats`, stored by :func:`app.bundle.reference_stats`
under ``visit_intervals``): over the training patients whose source has visit times
(``Patient.visit_times``: MIMIC-III/IV, eICU, a generic ``visit_time``), the quantiles at
``PROBS`` (1st to 99th percentile, so no single patient's extreme interval is stored) of

* ``stay_days``: length of stay, ``end - start`` of a visit;
* ``gap_days``: the gap from one visit's end to the next one's start (0 where visits overlap).

Without visit times (UCI, the simulated corpora, bundles written before this field), the
documented default :data:`DEFAULT_INTERVALS` applies: stays uniform in 1-11 days and gaps uniform
in 14-714 days (the scheme the MIMIC-III export always used).

**The dating scheme** (:class:`Dater`). For patient number ``n`` of a result whose identity is
``salt`` (a cohort's job id, which hashes its spec, seed and bundle; or a request's seed and
bundle), one random stream ``numpy.random.default_rng([hash(salt), n])`` draws, in order:

1. the first visit's start: a day uniform in the synthetic window 2100-01-01 + [0, 36,500)
   days (dates shifted into 2100-2200 as MIMIC-III shifts its own), at a uniform minute;
2. per visit a stay, then per following visit a gap, each by inverse-CDF sampling (linear
   interpolation between the stored quantiles), rounded to the minute;
3. the birth date: the first start minus ``age`` years (365.2425 days each), at midnight, so
   the birth year is consistent with the age at the first visit.

So starts and ends are in order (``start <= end <= next start``) and the same request and seed
give the same dates in every export.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np

__all__ = ["DEFAULT_INTERVALS", "PROBS", "WINDOW_START", "Dater", "PatientDates",
           "interval_stats"]

PROBS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
         0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
DEFAULT_INTERVALS: dict[str, Any] = {
    "source": "default", "n_patients": 0, "n_stays": 0, "n_gaps": 0,
    "probs": [0.0, 1.0], "stay_days": [1.0, 11.0], "gap_days": [14.0, 714.0]}
WINDOW_START = datetime(2100, 1, 1)
WINDOW_DAYS = 36_500
DAYS_PER_YEAR = 365.2425


def _quantiles(values: list[float]) -> list[float]:
    return [round(float(q), 4) for q in np.quantile(np.asarray(values, dtype=float), PROBS)]


def interval_stats(patients: Iterable) -> dict[str, Any]:
    """Quantiles of lengths of stay and inter-visit gaps (days) over the patients that carry
    ``visit_times``; :data:`DEFAULT_INTERVALS` when none does."""
    stays: list[float] = []
    gaps: list[float] = []
    n_patients = 0
    for p in patients:
        times = getattr(p, "visit_times", None)
        if not times:
            continue
        n_patients += 1
        for k, (start, end) in enumerate(times):
            stays.append(max(0.0, end - start))
            if k + 1 < len(times):
                gaps.append(max(0.0, times[k + 1][0] - end))
    if not stays:
        return dict(DEFAULT_INTERVALS)
    default = DEFAULT_INTERVALS
    return {"source": "training split", "n_patients": n_patients, "n_stays": len(stays),
            "n_gaps": len(gaps), "probs": list(PROBS), "stay_days": _quantiles(stays),
            # a corpus of single-visit patients has no gaps: keep the default's
            "gap_days": _quantiles(gaps) if gaps else list(default["gap_days"]),
            **({} if gaps else {"gap_probs": list(default["probs"])})}


@dataclass(frozen=True)
class PatientDates:
    """A patient's birth date and its visits' (start, end) times, in order."""

    birth: datetime
    visits: list[tuple[datetime, datetime]]


def _check(intervals: dict[str, Any]) -> dict[str, np.ndarray]:
    """The quantile tables as arrays; ``ValueError`` naming the key that is malformed."""
    out = {}
    for key, probs_key in (("stay_days", "probs"), ("gap_days", "gap_probs")):
        probs = np.asarray(intervals.get(probs_key, intervals.get("probs")), dtype=float)
        values = np.asarray(intervals.get(key), dtype=float)
        if (values.ndim != 1 or values.shape != probs.shape or values.size < 2
                or np.any(np.diff(values) < 0) or np.any(values < 0)
                or np.any(np.diff(probs) <= 0)):
            raise ValueError(f"visit_intervals.{key}: expected non-decreasing, non-negative "
                             f"quantiles matching {probs_key}")
        out[key] = values
        out[key + ":probs"] = probs
    return out


class Dater:
    """Dates for the patients of one result (see the module's scheme)."""

    def __init__(self, intervals: dict[str, Any] | None, salt: str) -> None:
        self.intervals = dict(intervals or DEFAULT_INTERVALS)
        self._tables = _check(self.intervals)
        self._salt = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "big")

    def _draw(self, key: str, u: np.ndarray) -> np.ndarray:
        probs = self._tables[key + ":probs"]
        # rescale u onto the stored probability range (the tails beyond it are not stored)
        return np.interp(probs[0] + u * (probs[-1] - probs[0]), probs, self._tables[key])

    def date(self, number: int, age: float, n_visits: int) -> PatientDates:
        """Birth date and visit times of patient ``number`` (1-based) aged ``age``."""
        rng = np.random.default_rng([self._salt, int(number)])
        first = WINDOW_START + timedelta(days=int(rng.integers(WINDOW_DAYS)),
                                         minutes=int(rng.integers(1440)))
        stays = self._draw("stay_days", rng.random(max(n_visits, 1)))
        gaps = self._draw("gap_days", rng.random(max(n_visits - 1, 0)))
        visits = []
        start = first
        for k in range(n_visits):
            end = start + timedelta(minutes=round(float(stays[k]) * 1440))
            visits.append((start, end))
            if k + 1 < n_visits:
                start = end + timedelta(minutes=round(float(gaps[k]) * 1440))
        birth = first - timedelta(days=float(age) * DAYS_PER_YEAR)
        birth = birth.replace(hour=0, minute=0, second=0, microsecond=0)
        return PatientDates(birth, visits)
