"""Fidelity: how closely a cohort's code statistics match the real test split's (DESIGN.md,
"Evaluation protocol"). Counting as in :mod:`app.evaluation.counting`; the real cohort is the
reference of every R2. Definitions, exactly:

JSD (:func:`code_jsd`)
    Base-2 Jensen-Shannon *divergence* (not the distance, its square root) between the code
    frequency distributions of the two cohorts, over the union of their codes; in [0, 1]:
    0 for identical distributions, 1 for disjoint supports.

Top-100 overlap (:func:`top_k_overlap`)
    Jaccard index |A n B| / |A u B| of the sets of the k = 100 most frequent codes of each
    cohort; ties in frequency are broken by code (ascending string order), so the result is
    deterministic. A cohort with fewer than k distinct codes contributes all of them.

Unigram R2 / bigram R2 (:func:`unigram_r2`, :func:`bigram_r2`)
    Coefficient of determination with the real cohort as the reference:
    ``1 - sum (y - yhat)^2 / sum (y - mean(y))^2`` where y is the real per-visit (pair)
    prevalence and yhat the synthetic one, over the *union* of codes (pairs) seen in either
    cohort, zero where a side never shows it. The union is the honest choice: a code or pair the
    generator invents (absent from the real cohort) is an error that a real-only support would
    hide, and a real code or pair the generator never emits is a miss that a synthetic-only
    support would hide. R2 can be negative; it is NaN where the real prevalences over the union
    have no variance and the two sides differ (e.g. nothing to compare).

Co-occurrence score (:func:`cooccurrence_score`)
    Mean, over all generated visits, of the sum over the visit's unordered code pairs of the
    number of *test*-split visits containing that pair. Visits with fewer than 2 codes have no
    pairs, score 0 and are included in the mean. (Computed without a per-visit loop as
    ``sum_{a<b} S[a,b] * C[a,b] / n_visits`` with S, C the synthetic and test pair counts.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from app.corpus import Patient
from app.evaluation.counting import (
    CodeIndex,
    code_counts,
    column_counts,
    pair_counts,
    visit_matrix,
    widen,
)

__all__ = [
    "aligned_prevalence",
    "bigram_r2",
    "code_jsd",
    "cooccurrence_from_pairs",
    "cooccurrence_score",
    "jsd_from_counts",
    "r2_score",
    "sparse_r2",
    "top_k_codes",
    "top_k_jaccard",
    "top_k_overlap",
    "unigram_r2",
]


def jsd_from_counts(p: np.ndarray, q: np.ndarray) -> float:
    """Base-2 Jensen-Shannon divergence of two aligned non-negative count vectors (normalised
    here); NaN if either is all zero."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(min(1.0, max(0.0, 0.5 * kl(p) + 0.5 * kl(q))))


def _aligned_counts(real: Mapping[str, float], synthetic: Mapping[str, float]
                    ) -> tuple[np.ndarray, np.ndarray]:
    codes = sorted(set(real) | set(synthetic))
    return (np.array([real.get(c, 0) for c in codes], dtype=np.float64),
            np.array([synthetic.get(c, 0) for c in codes], dtype=np.float64))


def code_jsd(real: Sequence[Patient], synthetic: Sequence[Patient]) -> float:
    """JSD (base 2, divergence) of the code frequency distributions of two cohorts."""
    return jsd_from_counts(*_aligned_counts(code_counts(real), code_counts(synthetic)))


def top_k_codes(counts: Mapping[str, float], k: int = 100) -> list[str]:
    """The k most frequent codes (count > 0), ties broken by code in ascending order."""
    ranked = sorted((c for c, n in counts.items() if n > 0), key=lambda c: (-counts[c], c))
    return ranked[:k]


def top_k_jaccard(real: Mapping[str, float], synthetic: Mapping[str, float], k: int) -> float:
    a, b = set(top_k_codes(real, k)), set(top_k_codes(synthetic, k))
    if not a and not b:
        return float("nan")
    return len(a & b) / len(a | b)


def top_k_overlap(real: Sequence[Patient], synthetic: Sequence[Patient], k: int = 100) -> float:
    """Jaccard index of the two cohorts' k most frequent codes."""
    return top_k_jaccard(code_counts(real), code_counts(synthetic), k)


def r2_score(y: np.ndarray, yhat: np.ndarray) -> float:
    """``1 - SS_res / SS_tot`` with ``y`` the reference; NaN when SS_tot is 0 and SS_res is not
    (1.0 when both are 0, i.e. identical)."""
    y = np.asarray(y, dtype=np.float64)
    yhat = np.asarray(yhat, dtype=np.float64)
    ss_res = float(np.sum((y - yhat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2)) if y.size else 0.0
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 and y.size else float("nan")
    return 1.0 - ss_res / ss_tot


def sparse_r2(real: sp.spmatrix, synthetic: sp.spmatrix) -> float:
    """:func:`r2_score` over the union of the non-zero entries of two same-shape non-negative
    sparse matrices (real as the reference), without densifying."""
    y = real.tocsr().astype(np.float64)
    yhat = synthetic.tocsr().astype(np.float64)
    y.eliminate_zeros()
    yhat.eliminate_zeros()
    support = (abs(y) + abs(yhat)).tocsr()
    support.eliminate_zeros()
    n = support.nnz
    if n == 0:
        return float("nan")
    diff = (y - yhat).tocsr()
    ss_res = float(np.sum(diff.data ** 2))
    mean = float(y.data.sum()) / n
    ss_tot = float(np.sum((y.data - mean) ** 2)) + (n - y.nnz) * mean ** 2
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else float("nan")
    return 1.0 - ss_res / ss_tot


def aligned_prevalence(real: Sequence[Patient], synthetic: Sequence[Patient], order: int = 1
                       ) -> tuple[np.ndarray, np.ndarray, list]:
    """Per-visit prevalence of codes (``order=1``) or unordered pairs (``order=2``) over the
    union seen in either cohort: ``(real, synthetic, keys)``, keys codes or (code, code)."""
    index = CodeIndex()
    xr, xs = visit_matrix(real, index), visit_matrix(synthetic, index)
    n_codes = len(index)
    xr, xs = widen(xr, n_codes), widen(xs, n_codes)
    nr, ns = max(xr.shape[0], 1), max(xs.shape[0], 1)
    if order == 1:
        y, yhat = column_counts(xr) / nr, column_counts(xs) / ns
        keep = np.flatnonzero((y > 0) | (yhat > 0))
        return y[keep], yhat[keep], [index.codes[i] for i in keep]
    if order != 2:
        raise ValueError("order must be 1 or 2")
    pr = pair_counts(xr).astype(np.float64) / nr
    ps = pair_counts(xs).astype(np.float64) / ns
    support = (pr + ps).tocoo()
    rows, cols = support.row, support.col
    y = np.asarray(pr[rows, cols]).ravel()
    yhat = np.asarray(ps[rows, cols]).ravel()
    keys = [(index.codes[a], index.codes[b]) for a, b in zip(rows, cols)]
    return y, yhat, keys


def unigram_r2(real: Sequence[Patient], synthetic: Sequence[Patient]) -> float:
    """R2 of per-visit code prevalence (real as reference) over the union of codes."""
    y, yhat, _ = aligned_prevalence(real, synthetic, 1)
    return r2_score(y, yhat) if y.size else float("nan")


def bigram_r2(real: Sequence[Patient], synthetic: Sequence[Patient]) -> float:
    """R2 of per-visit unordered-pair prevalence (real as reference) over the union of pairs."""
    index = CodeIndex()
    xr, xs = visit_matrix(real, index), visit_matrix(synthetic, index)
    xr, xs = widen(xr, len(index)), widen(xs, len(index))
    return sparse_r2(pair_counts(xr) / max(xr.shape[0], 1), pair_counts(xs) / max(xs.shape[0], 1))


def cooccurrence_from_pairs(synthetic_pairs: sp.spmatrix, test_pairs: sp.spmatrix,
                             n_visits: int) -> float:
    if n_visits == 0:
        return float("nan")
    return float(synthetic_pairs.multiply(test_pairs).sum()) / n_visits


def cooccurrence_score(synthetic: Sequence[Patient], test: Sequence[Patient]) -> float:
    """Mean over synthetic visits of the summed test-split visit counts of the visit's pairs
    (visits with < 2 codes score 0 and count in the mean)."""
    index = CodeIndex()
    xt, xs = visit_matrix(test, index), visit_matrix(synthetic, index)
    n = len(index)
    return cooccurrence_from_pairs(pair_counts(widen(xs, n)), pair_counts(widen(xt, n)),
                                    xs.shape[0])
