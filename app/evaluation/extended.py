"""The protocol's newer metrics for one cohort, against references built once per run:
sequential fidelity, long tail and strata (:mod:`app.evaluation.breakdown`), detection, TSTR
and attribute inference (:mod:`app.evaluation.learned`, scikit-learn).
:func:`app.evaluation.cohort.evaluate_cohort` keeps the original metrics; the evaluation driver
merges both into one row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from app.corpus import Patient
from app.evaluation.breakdown import (
    long_tail_metrics,
    sequential_r2,
    stratum_metrics,
    tail_codes,
)
from app.evaluation.protocol import gap_closed

__all__ = ["GAP_METRICS", "ExtendedReference", "add_gap_shares", "extended_metrics"]

# The R2s whose share of the baseline-to-floor gap is reported as ``<metric>_gap_closed``.
GAP_METRICS = ("unigram_r2", "bigram_r2", "sequential_r2", "tail_unigram_r2")

_ATTACK_STREAM = 0x617474  # "att": attack targets on a stream of their own
_TSTR_STREAM = 0x747374  # "tst"


@dataclass
class ExtendedReference:
    """What the newer metrics compare every cohort with, built once per run."""

    test: list[Patient]
    tail: set[str]
    seed: int = 0
    learned: bool = True
    min_support: int = 50
    utility_category: str | None = None
    utility_share: float = float("nan")
    tstr_auroc_real: float = float("nan")
    attack_targets: list[Patient] = field(default_factory=list)
    attr_inference_f1_holdout: float = float("nan")

    @classmethod
    def build(cls, test: Sequence[Patient], train: Sequence[Patient], seed: int = 0, *,
              learned: bool = True, attack_size: int = 1000, min_support: int = 50
              ) -> ExtendedReference:
        """``learned=False`` skips the scikit-learn metrics (then NaN). Attack targets:
        ``attack_size`` training patients; train-on-real: as many training patients as the
        test split has; both drawn from ``seed`` on streams of their own."""
        ref = cls(test=list(test), tail=tail_codes(train), seed=seed, learned=learned,
                  min_support=min_support)
        if not learned or not test or not train:
            return ref
        from app.evaluation.learned import (
            attribute_inference_f1,
            choose_utility_task,
            tstr_auroc,
        )

        ref.utility_category, ref.utility_share = choose_utility_task(train)
        rng = np.random.default_rng([seed, _TSTR_STREAM])
        size = min(len(test), len(train))
        real_train = [train[i] for i in np.sort(rng.choice(len(train), size, replace=False))]
        ref.tstr_auroc_real = tstr_auroc(real_train, ref.test, ref.utility_category, seed)
        rng = np.random.default_rng([seed, _ATTACK_STREAM])
        size = min(attack_size, len(train))
        ref.attack_targets = [train[i] for i in
                              np.sort(rng.choice(len(train), size, replace=False))]
        ref.attr_inference_f1_holdout = attribute_inference_f1(ref.test, ref.attack_targets)
        return ref


def extended_metrics(cohort: Sequence[Patient], ref: ExtendedReference
                     ) -> tuple[dict[str, float], dict]:
    """``(numbers, detail)``: the row's numbers (keys ``sequential_r2``, ``tail_*``,
    ``distinct_codes_test``, ``stratum_*``, ``detection_auc``, ``tstr_auroc``,
    ``tstr_auroc_real``, ``attr_inference_f1``, ``attr_inference_f1_holdout``) and detail that
    is not a number (``strata``: one entry per stratum; ``stratum_worst``: its label)."""
    numbers: dict[str, float] = {
        "sequential_r2": sequential_r2(ref.test, cohort, ref.min_support),
        **long_tail_metrics(ref.test, cohort, ref.tail),
    }
    summary, strata = stratum_metrics(ref.test, cohort)
    worst = summary.pop("stratum_worst")
    numbers.update(summary)
    nan = float("nan")
    numbers.update({"detection_auc": nan, "tstr_auroc": nan,
                    "tstr_auroc_real": ref.tstr_auroc_real, "attr_inference_f1": nan,
                    "attr_inference_f1_holdout": ref.attr_inference_f1_holdout})
    if ref.learned and cohort:
        from app.evaluation.learned import attribute_inference_f1, detection_auc, tstr_auroc

        numbers["detection_auc"] = detection_auc(ref.test, cohort, ref.seed)
        if ref.utility_category is not None:
            numbers["tstr_auroc"] = tstr_auroc(cohort, ref.test, ref.utility_category,
                                               ref.seed)
        numbers["attr_inference_f1"] = attribute_inference_f1(cohort, ref.attack_targets)
    return numbers, {"strata": strata, "stratum_worst": worst}


def add_gap_shares(rows: dict[str, dict[str, float]], floor: str = "floor",
                   baseline: str = "baseline") -> None:
    """Add ``<metric>_gap_closed`` (:func:`app.evaluation.protocol.gap_closed`) to every row, for each of
    :data:`GAP_METRICS`, in place; nothing without both reference rows."""
    if floor not in rows or baseline not in rows:
        return
    for row in rows.values():
        for key in GAP_METRICS:
            row[f"{key}_gap_closed"] = gap_closed(row.get(key, float("nan")),
                                                  rows[floor].get(key, float("nan")),
                                                  rows[baseline].get(key, float("nan")))

