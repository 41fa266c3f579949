"""One cohort's protocol row: every fidelity, structure and privacy metric against references
built once per run (DESIGN.md, "Evaluation protocol").

:class:`Reference` holds what every cohort is compared with (the test split's visit statistics,
the training split's record keys and code sets, the membership-inference candidates);
:func:`evaluate_cohort` scores one cohort against it, as a flat dict of floats. The numbers are
those of :mod:`app.evaluation.fidelity`, :mod:`~app.evaluation.structure` and
:mod:`~app.evaluation.privacy`, computed from shared matrices instead of once per metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from app.corpus import Patient
from app.evaluation.counting import (
    CodeIndex,
    codes_per_visit,
    column_counts,
    pair_counts,
    patient_matrix,
    visit_matrix,
    visits_per_patient,
    widen,
    widen_square,
)
from app.evaluation.fidelity import (
    cooccurrence_from_pairs,
    jsd_from_counts,
    r2_score,
    sparse_r2,
    top_k_jaccard,
)
from app.evaluation.privacy import (
    dcr_summary,
    exact_copy_rate,
    membership_inference_auc,
    nearest_jaccard_distance,
    record_key,
)
from app.evaluation.structure import invalid_codes, ks_statistic, well_formed_rate
from app.icd9.edits import CodeEdits

__all__ = [
    "Reference",
    "evaluate_cohort",
]


_MIA_STREAM = 0x6D6961  # "mia"



@dataclass
class Reference:
    """What every cohort is compared with, computed once per protocol run: the test split's
    visit statistics, the training split's record keys and code sets, and the fixed
    membership-inference candidates (members from train, non-members from test)."""

    index: CodeIndex
    n_test_patients: int
    test_visits: sp.csr_matrix
    test_pairs: sp.csr_matrix
    test_visits_per_patient: np.ndarray
    test_codes_per_visit: np.ndarray
    train_keys: set
    train_patients: sp.csr_matrix
    train_max_visit_len: int
    mia_members: sp.csr_matrix
    mia_non_members: sp.csr_matrix
    test_privacy: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, test: Sequence[Patient], train: Sequence[Patient], seed: int = 0,
              mia_size: int | None = None) -> Reference:
        """``mia_size`` members and as many non-members (default: as many as the test split,
        capped by both splits' sizes), drawn from ``seed`` on a stream of their own."""
        index = CodeIndex()
        test_visits = visit_matrix(test, index)
        train_patients = patient_matrix(train, index)
        test_patients = patient_matrix(test, index)
        n = len(index)
        test_visits = widen(test_visits, n)
        train_patients = widen(train_patients, n)
        test_patients = widen(test_patients, n)
        # A stream of its own, so the candidates never coincide with a floor sample drawn with
        # the same seed (that would make the floor's members the attacker's members).
        rng = np.random.default_rng([seed, _MIA_STREAM])
        size = min(len(test), len(train), mia_size if mia_size is not None else len(test))
        members = train_patients[np.sort(rng.choice(len(train), size, replace=False))]
        non_members = test_patients[
            np.sort(rng.choice(len(test), size, replace=False))]
        train_keys = {record_key(p) for p in train}
        ref = cls(
            index=index,
            n_test_patients=len(test),
            test_visits=test_visits,
            test_pairs=pair_counts(test_visits),
            test_visits_per_patient=visits_per_patient(test),
            test_codes_per_visit=codes_per_visit(test),
            train_keys=train_keys,
            train_patients=train_patients,
            train_max_visit_len=max((len(set(v)) for p in train for v in p.visits), default=0),
            mia_members=members,
            mia_non_members=non_members,
        )
        dcr_test = nearest_jaccard_distance(test_patients, train_patients)
        ref.test_privacy = {"exact_copy_rate_test": exact_copy_rate(test, train_keys),
                            **dcr_summary(dcr_test, "dcr_test")}
        return ref


def evaluate_cohort(synthetic: Sequence[Patient], test: Sequence[Patient] | None = None,
                    train: Sequence[Patient] | None = None, *, reference: Reference | None = None,
                    seed: int = 0, mia_size: int | None = None, edits: CodeEdits | None = None,
                    k: int = 100) -> dict[str, float]:
    """Every protocol metric of one cohort against the test split (fidelity) and the training
    split (privacy), as a flat dict of floats. Pass a prebuilt :class:`Reference` to score
    several cohorts against the same splits (then ``test``/``train`` are not read).

    Keys: ``n_patients, n_visits, distinct_codes, mean_codes_per_visit,
    mean_visits_per_patient, jsd, top100_overlap, unigram_r2, bigram_r2, cooccurrence_score,
    ks_visits_per_patient, ks_codes_per_visit, validity, invalid_codes, well_formed,
    over_length_visits`` (share of visits with more codes than the longest training visit),
    ``exact_copy_rate, exact_copy_rate_test, dcr_mean, dcr_median, dcr_zero_share,
    dcr_test_mean, dcr_test_median, dcr_test_zero_share, mia_auc``.
    """
    if reference is None:
        if test is None or train is None:
            raise ValueError("evaluate_cohort needs test and train, or a reference")
        reference = Reference.build(test, train, seed=seed, mia_size=mia_size)
    ref = reference
    index = ref.index.copy()
    xs = visit_matrix(synthetic, index)
    ps = patient_matrix(synthetic, index)
    n = len(index)
    xs, ps = widen(xs, n), widen(ps, n)
    xt = widen(ref.test_visits, n)
    nt, ns = xt.shape[0], xs.shape[0]
    count_t, count_s = column_counts(xt), column_counts(xs)
    pairs_t, pairs_s = widen_square(ref.test_pairs, n), pair_counts(xs)

    codes = index.codes
    counts_t = {codes[i]: count_t[i] for i in np.flatnonzero(count_t)}
    counts_s = {codes[i]: count_s[i] for i in np.flatnonzero(count_s)}
    if ns and nt:
        y, yhat = count_t / nt, count_s / ns
        union = (y > 0) | (yhat > 0)
        unigram = r2_score(y[union], yhat[union])
        bigram = sparse_r2(pairs_t / nt, pairs_s / ns)
    else:
        unigram = bigram = float("nan")
    cpv = codes_per_visit(synthetic)
    n_invalid = len(invalid_codes(synthetic, edits))
    n_codes = int(sum(len(v) for p in synthetic for v in p.visits))
    dcr = nearest_jaccard_distance(ps, ref.train_patients)
    metrics: dict[str, float] = {
        "n_patients": float(len(synthetic)),
        "n_visits": float(ns),
        "distinct_codes": float(np.count_nonzero(count_s)),
        "mean_codes_per_visit": float(cpv.mean()) if cpv.size else float("nan"),
        "mean_visits_per_patient": ns / len(synthetic) if synthetic else float("nan"),
        "jsd": jsd_from_counts(count_t, count_s),
        f"top{k}_overlap": top_k_jaccard(counts_t, counts_s, k),
        "unigram_r2": unigram,
        "bigram_r2": bigram,
        "cooccurrence_score": cooccurrence_from_pairs(pairs_s, pairs_t, ns),
        "ks_visits_per_patient": ks_statistic(ref.test_visits_per_patient,
                                              visits_per_patient(synthetic)),
        "ks_codes_per_visit": ks_statistic(ref.test_codes_per_visit, cpv),
        "validity": 1.0 - n_invalid / n_codes if n_codes else float("nan"),
        "invalid_codes": float(n_invalid),
        "well_formed": well_formed_rate(synthetic),
        "over_length_visits": float(np.mean(cpv > ref.train_max_visit_len))
        if cpv.size else float("nan"),
        "exact_copy_rate": exact_copy_rate(synthetic, ref.train_keys),
        **dcr_summary(dcr, "dcr"),
        "mia_auc": membership_inference_auc(ps, widen(ref.mia_members, n),
                                            widen(ref.mia_non_members, n)),
    }
    metrics.update(ref.test_privacy)
    return metrics
