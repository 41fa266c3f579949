"""Privacy: how much of the training split a cohort gives away (DESIGN.md, "Evaluation
protocol"). The exact-copy key and the nearest Jaccard distance are :mod:`app.similarity`'s, the
tests the ``retrieve_edit`` guard applies at generation time. Definitions, exactly:

Exact-copy rate (:func:`exact_copy_rate`)
    Share of patients whose *record* equals some training patient's record, where a record is
    the sequence of visits in order with each visit taken as a set of codes (demographics and
    ids ignored). Reported for the synthetic cohort and, as the reference, for the real test
    split (on UCI about 40% of real test patients are such copies).

Distance to closest record (:func:`distance_to_closest_record`)
    For each patient, the Jaccard distance ``1 - |A n B| / |A u B|`` between its set of all
    codes (over all visits) and that of the nearest training patient. Summarised as mean,
    median and the share at distance 0 (same code set as some training patient).

Membership-inference AUC (:func:`membership_inference_auc`)
    A nearest-neighbour attack by someone holding only the synthetic cohort: each candidate
    record is scored by its Jaccard distance (all-codes sets, as above) to the nearest
    synthetic patient; closer means "was in training". Members are a random sample of training
    patients, non-members an equal-sized random sample of test patients (never seen in
    training). The AUC of that score separating members from non-members, by the rank
    (Mann-Whitney) formula with average ranks for ties (ties count one half): 0.5 is no signal,
    1.0 a perfect attack.

"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from app.corpus import Patient
from app.evaluation.counting import CodeIndex, patient_matrix
from app.similarity import nearest_jaccard_distance, visits_key

__all__ = [
    "dcr_summary",
    "distance_to_closest_record",
    "exact_copy_rate",
    "membership_inference_auc",
    "nearest_jaccard_distance",
    "rank_auc",
    "record_key",
]


def record_key(patient: Patient) -> tuple[tuple[str, ...], ...]:
    """A patient's record for exact-copy matching: visits in order, each as a sorted code set
    (:func:`app.similarity.visits_key`, the ``retrieve_edit`` guard's own test)."""
    return visits_key(patient.visits)


def exact_copy_rate(patients: Sequence[Patient], train: Sequence[Patient] | set) -> float:
    """Share of ``patients`` whose record (:func:`record_key`) equals a training patient's.
    ``train`` may be the patients or a precomputed set of their record keys."""
    if len(patients) == 0:
        return float("nan")
    keys = train if isinstance(train, set) else {record_key(p) for p in train}
    return sum(record_key(p) in keys for p in patients) / len(patients)


def distance_to_closest_record(patients: Sequence[Patient], train: Sequence[Patient]
                               ) -> np.ndarray:
    """Jaccard distance from each patient's set of all codes to the nearest training patient's."""
    index = CodeIndex()
    q = patient_matrix(patients, index)
    b = patient_matrix(train, index)
    return nearest_jaccard_distance(q, b)


def dcr_summary(distances: np.ndarray, prefix: str = "dcr") -> dict[str, float]:
    """Mean, median and share at exactly 0 of distances to closest record."""
    d = np.asarray(distances, dtype=np.float64)
    if d.size == 0:
        nan = float("nan")
        return {f"{prefix}_mean": nan, f"{prefix}_median": nan, f"{prefix}_zero_share": nan}
    return {f"{prefix}_mean": float(d.mean()), f"{prefix}_median": float(np.median(d)),
            f"{prefix}_zero_share": float(np.mean(d == 0.0))}


def rank_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUC = P(score of a positive > score of a negative), ties counted one half, by the
    Mann-Whitney rank formula with average ranks."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def membership_inference_auc(synthetic: Sequence[Patient] | sp.spmatrix,
                             members: Sequence[Patient] | sp.spmatrix,
                             non_members: Sequence[Patient] | sp.spmatrix) -> float:
    """AUC of the nearest-neighbour attack: a candidate's score is minus its Jaccard distance
    (all-codes sets) to the closest synthetic patient; members are the positives.

    Arguments are patient lists, or patients x codes binary matrices over one shared index.
    """
    if sp.issparse(synthetic):
        s, m, n = synthetic, members, non_members
    else:
        index = CodeIndex()
        s = patient_matrix(synthetic, index)
        m = patient_matrix(members, index)
        n = patient_matrix(non_members, index)
    d_members = nearest_jaccard_distance(m, s)
    d_non = nearest_jaccard_distance(n, s)
    return rank_auc(-d_members, -d_non)
