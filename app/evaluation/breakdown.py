"""Protocol metrics that break fidelity down: across visits, into the long tail, and by
demographic stratum (DESIGN.md, "Evaluation protocol"). numpy/scipy only, like
:mod:`app.evaluation.fidelity`, whose counting conventions (a visit is a set of codes; real is
the reference of every R2) they share. Definitions, exactly:

Sequential R2 (:func:`sequential_r2`)
    A *transition* is a pair of consecutive visits (t, t+1) of one patient. For codes a, b:
    ``N(a)`` is the number of transitions whose visit t contains a, ``N(a -> b)`` the number
    whose visit t contains a and visit t+1 contains b (a = b included), and
    ``P(b | a) = N(a -> b) / N(a)``. The R2 compares real and synthetic ``P(b | a)`` (real as the
    reference) over every (a, b) seen after a on either side, for the conditioning codes a with
    *enough support*: ``N_real(a) >= min_support`` (default 50) in the real cohort. The
    default comes from UCI (``bench/sequential_support.py``): the real floor's sequential R2 is
    -0.13, 0.55, 0.79 and 0.89 at 10, 30, 50 and 100 (the independent-marginals baseline:
    -0.47, 0.08, 0.29, 0.40; 3,140 test transitions); below about 50 transitions a
    conditional probability is mostly sampling noise. Where the
    synthetic cohort never has a in a visit that is followed by another, its ``P(. | a)`` is 0
    (a miss, not a skip). NaN when no code has enough support (e.g. single-visit cohorts).

Long tail (:func:`long_tail_metrics`)
    The tail is the set of codes whose training frequency (visits containing the code, training
    split) is *strictly below the median* training frequency over the training split's distinct
    codes. Tail JSD is :func:`app.evaluation.fidelity.jsd_from_counts` of the real and synthetic frequencies
    of tail codes only (renormalised within the tail); tail unigram R2 is the per-visit
    prevalence R2 (denominators: all visits of each cohort) over the tail codes seen on either
    side; ``tail_distinct_codes`` counts tail codes the cohort contains. ``distinct_codes_test``
    and ``tail_distinct_codes_test`` are the real test split's counts, the reference.

Per stratum (:func:`stratum_metrics`)
    Patients are grouped by age band at first visit x sex, with the bands of
    :data:`STRATUM_AGE_BANDS` (0-17, 18-44, 45-64, 65-74, 75+; coarser than the report's age
    histogram so that strata keep enough patients). Within each stratum holding at least
    ``min_patients`` (default 30) real test patients *and* as many cohort patients, the code
    JSD and unigram R2 are computed as for the whole cohort. Summaries: the worst stratum's JSD
    (largest) and unigram R2 (smallest), with its label, and the patient-weighted mean JSD.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from app.corpus import Patient
from app.evaluation.counting import CodeIndex, code_counts, visit_matrix, widen
from app.evaluation.fidelity import jsd_from_counts, r2_score, sparse_r2

__all__ = [
    "STRATUM_AGE_BANDS",
    "conditional_probabilities",
    "long_tail_metrics",
    "sequential_r2",
    "stratum_label",
    "stratum_metrics",
    "stratum_of",
    "tail_codes",
    "transition_counts",
]

# Age bands (years at first visit, [low, high)) of the per-stratum metrics.
STRATUM_AGE_BANDS: tuple[tuple[int, int], ...] = ((0, 18), (18, 45), (45, 65), (65, 75),
                                                  (75, 200))


# -- sequential --------------------------------------------------------------------------------

def transition_counts(patients: Sequence[Patient], index: CodeIndex
                      ) -> tuple[np.ndarray, sp.csr_matrix]:
    """``(N(a), N(a -> b))`` over consecutive visits: a vector over the index's codes and a
    sparse codes x codes matrix (adds new codes to ``index``; callers widen to its final
    size)."""
    before: list[Patient] = []
    after: list[Patient] = []
    for p in patients:
        for t in range(len(p.visits) - 1):
            before.append(Patient("", 0.0, "F", (p.visits[t],)))
            after.append(Patient("", 0.0, "F", (p.visits[t + 1],)))
    a = visit_matrix(before, index)
    b = visit_matrix(after, index)
    n = len(index)
    a, b = widen(a, n), widen(b, n)
    n_a = np.asarray(a.sum(axis=0)).ravel().astype(np.float64)
    return n_a, (a.T @ b).tocsr().astype(np.float64)


def conditional_probabilities(real: Sequence[Patient], synthetic: Sequence[Patient],
                              min_support: int = 50) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Real and synthetic ``P(b | a)`` as codes x codes sparse matrices over one index, rows
    kept only for conditioning codes with ``N_real(a) >= min_support`` (others all zero)."""
    index = CodeIndex()
    n_real, pairs_real = transition_counts(real, index)
    n_syn, pairs_syn = transition_counts(synthetic, index)
    n = len(index)
    n_real = np.pad(n_real, (0, n - n_real.size))
    n_syn = np.pad(n_syn, (0, n - n_syn.size))
    keep = (n_real >= min_support).astype(np.float64)
    inv_real = np.divide(keep, n_real, out=np.zeros(n), where=n_real > 0)
    inv_syn = np.divide(keep, n_syn, out=np.zeros(n), where=n_syn > 0)
    p_real = (sp.diags(inv_real) @ _square(pairs_real, n)).tocsr()
    p_syn = (sp.diags(inv_syn) @ _square(pairs_syn, n)).tocsr()
    p_real.eliminate_zeros()
    p_syn.eliminate_zeros()
    return p_real, p_syn


def sequential_r2(real: Sequence[Patient], synthetic: Sequence[Patient],
                  min_support: int = 50) -> float:
    """R2 of consecutive-visit conditional probabilities ``P(code b in visit t+1 | code a in
    visit t)``, real as the reference, over conditioning codes with ``N_real(a) >=
    min_support`` (module docstring)."""
    p_real, p_syn = conditional_probabilities(real, synthetic, min_support)
    if p_real.nnz == 0:
        return float("nan")  # no conditioning code with enough support
    return sparse_r2(p_real, p_syn)


def _square(matrix: sp.csr_matrix, n: int) -> sp.csr_matrix:
    coo = matrix.tocoo()
    return sp.csr_matrix((coo.data, (coo.row, coo.col)), shape=(n, n))


# -- long tail ---------------------------------------------------------------------------------

def tail_codes(train: Sequence[Patient]) -> set[str]:
    """Training codes whose frequency (visits containing them) is strictly below the median
    frequency of the training split's distinct codes."""
    counts = code_counts(train)
    if not counts:
        return set()
    median = float(np.median(np.fromiter(counts.values(), dtype=np.float64)))
    return {c for c, n in counts.items() if n < median}


def long_tail_metrics(real: Sequence[Patient], synthetic: Sequence[Patient],
                      tail: set[str]) -> dict[str, float]:
    """``tail_jsd``, ``tail_unigram_r2``, ``tail_distinct_codes``, ``distinct_codes_test``,
    ``tail_distinct_codes_test`` and ``tail_codes`` (the size of the tail) of one cohort."""
    counts_r, counts_s = code_counts(real), code_counts(synthetic)
    codes = sorted(tail)
    y = np.array([counts_r.get(c, 0) for c in codes], dtype=np.float64)
    yhat = np.array([counts_s.get(c, 0) for c in codes], dtype=np.float64)
    nr = max(sum(len(p.visits) for p in real), 1)
    ns = max(sum(len(p.visits) for p in synthetic), 1)
    seen = (y > 0) | (yhat > 0)
    r2 = r2_score(y[seen] / nr, yhat[seen] / ns) if seen.any() else float("nan")
    return {
        "tail_jsd": jsd_from_counts(y, yhat),
        "tail_unigram_r2": r2,
        "tail_distinct_codes": float(np.count_nonzero(yhat)),
        "tail_distinct_codes_test": float(np.count_nonzero(y)),
        "distinct_codes_test": float(len(counts_r)),
        "tail_codes": float(len(codes)),
    }


# -- per stratum -------------------------------------------------------------------------------

def stratum_label(band: int, sex: str) -> str:
    low, high = STRATUM_AGE_BANDS[band]
    return f"{low}+ {sex}" if high >= 200 else f"{low}-{high - 1} {sex}"


def stratum_of(patient: Patient) -> tuple[int, str] | None:
    """(band index, sex) of a patient, or None if the age lies outside every band."""
    for b, (low, high) in enumerate(STRATUM_AGE_BANDS):
        if low <= patient.age < high:
            return b, patient.sex
    return None


def _by_stratum(patients: Sequence[Patient]) -> dict[tuple[int, str], list[Patient]]:
    out: dict[tuple[int, str], list[Patient]] = {}
    for p in patients:
        key = stratum_of(p)
        if key is not None:
            out.setdefault(key, []).append(p)
    return out


def _unigram_r2(real: Sequence[Patient], synthetic: Sequence[Patient]) -> float:
    counts_r, counts_s = code_counts(real), code_counts(synthetic)
    codes = sorted(set(counts_r) | set(counts_s))
    nr = max(sum(len(p.visits) for p in real), 1)
    ns = max(sum(len(p.visits) for p in synthetic), 1)
    y = np.array([counts_r.get(c, 0) for c in codes], dtype=np.float64) / nr
    yhat = np.array([counts_s.get(c, 0) for c in codes], dtype=np.float64) / ns
    return r2_score(y, yhat) if codes else float("nan")


def stratum_metrics(real: Sequence[Patient], synthetic: Sequence[Patient],
                    min_patients: int = 30) -> tuple[dict[str, float], list[dict]]:
    """Per age band x sex JSD and unigram R2 (module docstring): ``(summary, strata)``.

    ``summary`` has ``stratum_jsd_worst``, ``stratum_unigram_r2_worst``, ``stratum_jsd_mean``
    (weighted by real test patients) and ``strata_scored``; ``strata`` lists every stratum
    present on either side as ``{"stratum", "n_real", "n_cohort", "jsd", "unigram_r2"}``
    (NaN where too small), with the worst stratum's label in ``summary`` under
    ``"stratum_worst"`` (a string, so callers keep it apart from the numbers).
    """
    real_groups, syn_groups = _by_stratum(real), _by_stratum(synthetic)
    keys = sorted(set(real_groups) | set(syn_groups))
    strata = []
    for key in keys:
        a, b = real_groups.get(key, []), syn_groups.get(key, [])
        jsd = r2 = float("nan")
        if len(a) >= min_patients and len(b) >= min_patients:
            ca, cb = code_counts(a), code_counts(b)
            codes = sorted(set(ca) | set(cb))
            jsd = jsd_from_counts(np.array([ca.get(c, 0) for c in codes]),
                                  np.array([cb.get(c, 0) for c in codes]))
            r2 = _unigram_r2(a, b)
        strata.append({"stratum": stratum_label(*key), "n_real": len(a), "n_cohort": len(b),
                       "jsd": jsd, "unigram_r2": r2})
    scored = [s for s in strata if np.isfinite(s["jsd"])]
    summary: dict = {"strata_scored": float(len(scored))}
    if scored:
        worst = max(scored, key=lambda s: s["jsd"])
        weights = np.array([s["n_real"] for s in scored], dtype=np.float64)
        summary.update({
            "stratum_jsd_worst": worst["jsd"],
            "stratum_worst": worst["stratum"],
            "stratum_unigram_r2_worst": float(min(s["unigram_r2"] for s in scored)),
            "stratum_jsd_mean": float(np.average([s["jsd"] for s in scored],
                                                 weights=weights)),
        })
    else:
        summary.update({"stratum_jsd_worst": float("nan"), "stratum_worst": "",
                        "stratum_unigram_r2_worst": float("nan"),
                        "stratum_jsd_mean": float("nan")})
    return summary, strata
