"""Two-stage generation: a patient's visit count and codes per visit first, then its codes.

With ``two_stage`` on (a field of every strategy's parameters that decodes from the
demographics), each row first draws its number of visits from the training split's
visits-per-patient histogram and, for each visit, its number of codes from the codes-per-visit
histogram (both from the bundle's reference statistics), then the model fills the visits: the
two stop decisions of the grammar are forced to the plan (a ``-FORCE`` offset on the token the
plan rules out), everything else is the model's. The draws come from each row's own counter-based
stream (the row's key mixed with a plan stream), so a patient still depends on its seed and
index only, and a rolled-over long patient keeps its plan across windows.

It is the ablation of the issue's "two-stage generation" option; the stop calibration
(:mod:`app.decoding.calibration`) is the default way the structure is matched, since it keeps
the model's dependence between what a visit holds and how long it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from app.decoding.sampling import row_keys, uniforms

__all__ = ["FORCE", "LengthPlan"]

FORCE = 1.0e4  # a finite offset: a ruled-out stop keeps a defined probability of ~exp(-FORCE)
_PLAN_STREAM = 0x504C414E  # the plan's draws: the row's key mixed with this stream


def _cdf(histogram: Mapping[Any, float]) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(sorted(int(k) for k in histogram), dtype=np.int64)
    weights = np.asarray([float(histogram[k]) for k in sorted(histogram, key=int)])
    keep = (values >= 1) & (weights > 0)
    values, weights = values[keep], weights[keep]
    if values.size == 0:
        raise ValueError("two-stage plan: an empty length histogram")
    return values, np.cumsum(weights) / weights.sum()


class LengthPlan:
    """Planned visits per patient and codes per visit, drawn from training histograms."""

    def __init__(self, visits_per_patient: Mapping[Any, float],
                 codes_per_visit: Mapping[Any, float]) -> None:
        self._visits = _cdf(visits_per_patient)
        self._codes = _cdf(codes_per_visit)

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any] | None) -> LengthPlan | None:
        """The plan of a bundle's reference statistics (None where they lack the histograms)."""
        if not stats or not stats.get("visits_per_patient") or not stats.get("codes_per_visit"):
            return None
        return cls(stats["visits_per_patient"], stats["codes_per_visit"])

    @staticmethod
    def _draw(cdf: tuple[np.ndarray, np.ndarray], u: np.ndarray) -> np.ndarray:
        values, cumulative = cdf
        return values[np.minimum(np.searchsorted(cumulative, u, side="right"),
                                 values.size - 1)]

    def visits(self, keys: np.ndarray) -> np.ndarray:
        """Planned visit count of each row (``keys``: the rows' base keys)."""
        plan_keys = row_keys(keys, np.zeros(keys.size, dtype=np.int64), _PLAN_STREAM)
        return self._draw(self._visits, uniforms(plan_keys, 0))

    def codes(self, keys: np.ndarray, visit: np.ndarray) -> np.ndarray:
        """Planned codes of visit ``visit`` (0-based) of each row."""
        plan_keys = row_keys(keys, np.asarray(visit, dtype=np.int64) + 1, _PLAN_STREAM)
        return self._draw(self._codes, uniforms(plan_keys, 0))

    def apply(self, scores: np.ndarray, keys: np.ndarray, after_visit: np.ndarray,
              n_visits: np.ndarray, in_visit: np.ndarray, n_codes: np.ndarray,
              eos_id: int, visit_id: int, end_visit_id: int, n_special: int) -> np.ndarray:
        """``scores`` with the plan's stops forced (a copy). ``n_visits``: visits opened so
        far (the grammar's count); ``n_codes``: codes in the current visit."""
        out = scores.copy()
        rows = np.flatnonzero(after_visit)
        if rows.size:
            go_on = n_visits[rows] < self.visits(keys[rows])
            out[rows[go_on], eos_id] -= FORCE
            out[rows[~go_on], visit_id] -= FORCE
        rows = np.flatnonzero(in_visit & (n_codes >= 1))
        if rows.size:
            more = n_codes[rows] < self.codes(keys[rows], n_visits[rows] - 1)
            out[rows[more], end_visit_id] -= FORCE
            out[rows[~more], n_special:] -= FORCE
        return out
