"""The evaluation protocol's metrics (DESIGN.md, "Evaluation protocol"), numpy/scipy only.

Everything here takes lists of :class:`app.corpus.Patient` (or decoded token lists) and returns
plain numbers, so the same code scores a model's cohort, the real floor and the baseline, in
tests, benchmarks and the README table. Definitions, exactly:

Counting
    A visit is a set of codes (a code counts once per visit). The *frequency* of a code is the
    number of visits that contain it; its *per-visit prevalence* is that count over the number
    of visits. The *pair prevalence* of an unordered pair {a, b} (a != b) is the share of visits
    containing both. Pair statistics come from a sparse visits x codes incidence matrix X as the
    strict upper triangle of X'X, never a dense codes x codes array.

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

KS statistics (:func:`ks_visits_per_patient`, :func:`ks_codes_per_visit`)
    The two-sample Kolmogorov-Smirnov statistic (:func:`scipy.stats.ks_2samp`) of visits per
    patient and of codes per visit (distinct codes), real vs synthetic.

Validity (:func:`validity`)
    Share of generated code occurrences consistent with their patient's age and sex under the
    CMS MCE v32 age and sex edits (:mod:`app.icd9.edits`).

Well-formed rate (:func:`well_formed_token_rate`, :func:`well_formed_rate`)
    For decoded token sequences: the grammar ``<s> (<v> code+ </v>)+ </s>`` holds exactly (it
    starts with BOS and ends with EOS, trailing padding aside; no empty visit; no repeated code
    within a visit; no stray special token). For patients: at least one visit, no empty visit,
    no code repeated within a visit, every code a non-empty string.

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

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.stats import ks_2samp, rankdata

from app.corpus import Patient
from app.icd9.edits import CodeEdits, load_edits
from app.similarity import nearest_jaccard_distance, visits_key

__all__ = [
    "GAP_SHARE",
    "PROTOCOL_TARGETS",
    "RELATIVE_TARGETS",
    "TARGET_PROFILES",
    "UCI_TARGETS",
    "CodeIndex",
    "Reference",
    "Target",
    "aligned_prevalence",
    "bigram_r2",
    "check_targets",
    "code_counts",
    "code_jsd",
    "cooccurrence_score",
    "dcr_summary",
    "distance_to_closest_record",
    "evaluate_cohort",
    "exact_copy_rate",
    "gap_closed",
    "independent_marginals_sampler",
    "invalid_codes",
    "jsd_from_counts",
    "ks_codes_per_visit",
    "ks_statistic",
    "ks_visits_per_patient",
    "membership_inference_auc",
    "nearest_jaccard_distance",
    "pair_counts",
    "patient_matrix",
    "r2_score",
    "rank_auc",
    "real_floor_sample",
    "record_key",
    "sparse_r2",
    "top_k_codes",
    "top_k_overlap",
    "unigram_r2",
    "validity",
    "visit_matrix",
    "well_formed_patient",
    "well_formed_rate",
    "well_formed_token_rate",
    "well_formed_tokens",
]


# -- code indexing and incidence matrices ------------------------------------------------------

class CodeIndex:
    """Code -> column index, growing as new codes are seen (columns are never reordered)."""

    def __init__(self, codes: Iterable[str] = ()) -> None:
        self._ids: dict[str, int] = {}
        self.codes: list[str] = []
        for code in codes:
            self.add(code)

    def add(self, code: str) -> int:
        idx = self._ids.get(code)
        if idx is None:
            idx = len(self.codes)
            self._ids[code] = idx
            self.codes.append(code)
        return idx

    def get(self, code: str) -> int | None:
        return self._ids.get(code)

    def copy(self) -> CodeIndex:
        other = CodeIndex()
        other._ids = dict(self._ids)
        other.codes = list(self.codes)
        return other

    def __len__(self) -> int:
        return len(self.codes)

    def __contains__(self, code: str) -> bool:
        return code in self._ids


def _csr(indptr: list[int], indices: list[int], n_cols: int) -> sp.csr_matrix:
    data = np.ones(len(indices), dtype=np.int64)
    return sp.csr_matrix((data, np.asarray(indices, dtype=np.int64),
                          np.asarray(indptr, dtype=np.int64)),
                         shape=(len(indptr) - 1, n_cols))


def visit_matrix(patients: Iterable[Patient], index: CodeIndex) -> sp.csr_matrix:
    """Binary visits x codes CSR (int64), visits in patient then time order; adds new codes to
    ``index``. A code repeated inside a visit counts once."""
    indptr, indices = [0], []
    add = index.add
    for patient in patients:
        for visit in patient.visits:
            indices.extend(sorted({add(c) for c in visit}))
            indptr.append(len(indices))
    return _csr(indptr, indices, len(index))


def patient_matrix(patients: Iterable[Patient], index: CodeIndex) -> sp.csr_matrix:
    """Binary patients x codes CSR (int64): each patient's set of codes over all visits."""
    indptr, indices = [0], []
    add = index.add
    for patient in patients:
        indices.extend(sorted({add(c) for v in patient.visits for c in v}))
        indptr.append(len(indices))
    return _csr(indptr, indices, len(index))


def _widen(matrix: sp.spmatrix, n_cols: int) -> sp.csr_matrix:
    """The same matrix with extra all-zero columns up to ``n_cols`` (for a grown index)."""
    matrix = matrix.tocsr()
    if matrix.shape[1] == n_cols:
        return matrix
    return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr),
                         shape=(matrix.shape[0], n_cols))


def _widen_square(matrix: sp.spmatrix, n: int) -> sp.csr_matrix:
    matrix = matrix.tocsr()
    if matrix.shape == (n, n):
        return matrix
    indptr = np.concatenate([matrix.indptr,
                             np.full(n - matrix.shape[0], matrix.indptr[-1])])
    return sp.csr_matrix((matrix.data, matrix.indices, indptr), shape=(n, n))


def pair_counts(visits: sp.spmatrix) -> sp.csr_matrix:
    """Strict upper triangle of X'X for a binary visits x codes X: ``[a, b]`` (a < b) is the
    number of visits containing both codes."""
    x = visits.tocsr().astype(np.int64)
    product = (x.T @ x).tocsr()
    upper = sp.triu(product, k=1, format="csr")
    upper.eliminate_zeros()
    return upper


def _column_counts(visits: sp.spmatrix) -> np.ndarray:
    return np.asarray(visits.sum(axis=0)).ravel().astype(np.float64)


# -- fidelity ----------------------------------------------------------------------------------

def code_counts(patients: Iterable[Patient]) -> Counter:
    """Code -> number of visits containing it."""
    return Counter(c for p in patients for v in p.visits for c in set(v))


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


def _top_k_jaccard(real: Mapping[str, float], synthetic: Mapping[str, float], k: int) -> float:
    a, b = set(top_k_codes(real, k)), set(top_k_codes(synthetic, k))
    if not a and not b:
        return float("nan")
    return len(a & b) / len(a | b)


def top_k_overlap(real: Sequence[Patient], synthetic: Sequence[Patient], k: int = 100) -> float:
    """Jaccard index of the two cohorts' k most frequent codes."""
    return _top_k_jaccard(code_counts(real), code_counts(synthetic), k)


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
    xr, xs = _widen(xr, n_codes), _widen(xs, n_codes)
    nr, ns = max(xr.shape[0], 1), max(xs.shape[0], 1)
    if order == 1:
        y, yhat = _column_counts(xr) / nr, _column_counts(xs) / ns
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
    xr, xs = _widen(xr, len(index)), _widen(xs, len(index))
    return sparse_r2(pair_counts(xr) / max(xr.shape[0], 1), pair_counts(xs) / max(xs.shape[0], 1))


def _cooccurrence_from_pairs(synthetic_pairs: sp.spmatrix, test_pairs: sp.spmatrix,
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
    return _cooccurrence_from_pairs(pair_counts(_widen(xs, n)), pair_counts(_widen(xt, n)),
                                    xs.shape[0])


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample KS statistic (scipy.stats.ks_2samp); NaN if a side is empty."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(ks_2samp(np.asarray(a, dtype=np.float64),
                          np.asarray(b, dtype=np.float64)).statistic)


def _visits_per_patient(patients: Sequence[Patient]) -> np.ndarray:
    return np.array([len(p.visits) for p in patients], dtype=np.int64)


def _codes_per_visit(patients: Sequence[Patient]) -> np.ndarray:
    return np.array([len(set(v)) for p in patients for v in p.visits], dtype=np.int64)


def ks_visits_per_patient(real: Sequence[Patient], synthetic: Sequence[Patient]) -> float:
    return ks_statistic(_visits_per_patient(real), _visits_per_patient(synthetic))


def ks_codes_per_visit(real: Sequence[Patient], synthetic: Sequence[Patient]) -> float:
    return ks_statistic(_codes_per_visit(real), _codes_per_visit(synthetic))


# -- validity and structure --------------------------------------------------------------------

def invalid_codes(patients: Iterable[Patient], edits: CodeEdits | None = None
                  ) -> list[tuple[str, str, str]]:
    """``(patient_id, code, reason)`` for every code occurrence failing the MCE age/sex edits."""
    edits = edits or load_edits()
    found = []
    for p in patients:
        for visit in p.visits:
            for code in visit:
                reason = edits.violation(code, p.age, p.sex)
                if reason is not None:
                    found.append((p.patient_id, code, reason))
    return found


def validity(patients: Sequence[Patient], edits: CodeEdits | None = None) -> float:
    """Share of code occurrences consistent with the patient's age and sex (MCE edits); NaN if
    there are no codes."""
    total = sum(len(v) for p in patients for v in p.visits)
    if total == 0:
        return float("nan")
    return 1.0 - len(invalid_codes(patients, edits)) / total


def well_formed_tokens(tokens: Sequence, vocab_tokens: Sequence[str] | None = None) -> bool:
    """Whether a decoded sequence follows ``<s> (<v> code+ </v>)+ </s>``.

    ``tokens`` are token strings, or token ids with ``vocab_tokens`` (id -> string, e.g.
    :attr:`app.vocab.Vocabulary.tokens`). Trailing ``<pad>`` after ``</s>`` is allowed;
    anything else after ``</s>``, a missing ``</s>``, an empty visit, a code repeated within a
    visit, or any other special token (``<mask>``, a nested ``<v>``) makes it ill-formed.
    """
    from app.vocab import BOS, END_VISIT, EOS, PAD, SPECIAL_TOKENS, VISIT

    seq = [vocab_tokens[t] for t in tokens] if vocab_tokens is not None else list(tokens)
    while seq and seq[-1] == PAD:
        seq.pop()
    if len(seq) < 5 or seq[0] != BOS or seq[-1] != EOS:
        return False
    specials = set(SPECIAL_TOKENS)
    visit: set | None = None  # None: between visits
    n_visits = 0
    for tok in seq[1:-1]:
        if tok == VISIT:
            if visit is not None:
                return False
            visit = set()
        elif tok == END_VISIT:
            if not visit:  # outside a visit, or an empty one
                return False
            visit = None
            n_visits += 1
        elif tok in specials or not isinstance(tok, str) or not tok:
            return False
        else:
            if visit is None or tok in visit:
                return False
            visit.add(tok)
    return visit is None and n_visits > 0


def well_formed_token_rate(sequences: Sequence[Sequence],
                           vocab_tokens: Sequence[str] | None = None) -> float:
    """Share of decoded token sequences that are well formed (NaN for none)."""
    if len(sequences) == 0:
        return float("nan")
    return sum(well_formed_tokens(s, vocab_tokens) for s in sequences) / len(sequences)


def well_formed_patient(patient: Patient) -> bool:
    """At least one visit; every visit non-empty, duplicate-free, of non-empty string codes."""
    if not patient.visits:
        return False
    for visit in patient.visits:
        if len(visit) == 0 or len(set(visit)) != len(visit):
            return False
        if not all(isinstance(c, str) and c for c in visit):
            return False
    return True


def well_formed_rate(patients: Sequence[Patient]) -> float:
    """Share of patients that are well formed (:func:`well_formed_patient`)."""
    if len(patients) == 0:
        return float("nan")
    return sum(well_formed_patient(p) for p in patients) / len(patients)


# -- privacy -----------------------------------------------------------------------------------

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


# -- the protocol ------------------------------------------------------------------------------

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
        test_visits = _widen(test_visits, n)
        train_patients = _widen(train_patients, n)
        test_patients = _widen(test_patients, n)
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
            test_visits_per_patient=_visits_per_patient(test),
            test_codes_per_visit=_codes_per_visit(test),
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
    xs, ps = _widen(xs, n), _widen(ps, n)
    xt = _widen(ref.test_visits, n)
    nt, ns = xt.shape[0], xs.shape[0]
    count_t, count_s = _column_counts(xt), _column_counts(xs)
    pairs_t, pairs_s = _widen_square(ref.test_pairs, n), pair_counts(xs)

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
    cpv = _codes_per_visit(synthetic)
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
        f"top{k}_overlap": _top_k_jaccard(counts_t, counts_s, k),
        "unigram_r2": unigram,
        "bigram_r2": bigram,
        "cooccurrence_score": _cooccurrence_from_pairs(pairs_s, pairs_t, ns),
        "ks_visits_per_patient": ks_statistic(ref.test_visits_per_patient,
                                              _visits_per_patient(synthetic)),
        "ks_codes_per_visit": ks_statistic(ref.test_codes_per_visit, cpv),
        "validity": 1.0 - n_invalid / n_codes if n_codes else float("nan"),
        "invalid_codes": float(n_invalid),
        "well_formed": well_formed_rate(synthetic),
        "over_length_visits": float(np.mean(cpv > ref.train_max_visit_len))
        if cpv.size else float("nan"),
        "exact_copy_rate": exact_copy_rate(synthetic, ref.train_keys),
        **dcr_summary(dcr, "dcr"),
        "mia_auc": membership_inference_auc(ps, _widen(ref.mia_members, n),
                                            _widen(ref.mia_non_members, n)),
    }
    metrics.update(ref.test_privacy)
    return metrics


# -- references --------------------------------------------------------------------------------

def real_floor_sample(train: Sequence[Patient], n: int, seed: int = 0) -> list[Patient]:
    """The floor: ``n`` real training patients drawn without replacement (with replacement
    only if ``n`` exceeds the split), in their split order."""
    rng = np.random.default_rng(seed)
    replace = n > len(train)
    picks = rng.choice(len(train), n, replace=replace)
    if not replace:
        picks = np.sort(picks)
    return [train[i] for i in picks]


def independent_marginals_sampler(train: Sequence[Patient], n: int,
                                  demographics: Sequence[tuple[float, str]] | None = None,
                                  seed: int = 0) -> list[Patient]:
    """The baseline: ``n`` patients whose visits-per-patient and codes-per-visit are drawn from
    the training split's empirical distributions and whose codes are drawn independently of
    everything (demographics, other codes, other visits) from the training code frequencies,
    without repeats inside a visit (successive sampling: draws proportional to frequency among
    the codes not yet in the visit). ``demographics`` (age, sex) per patient are attached as
    given (the sampler ignores them); by default they are drawn from the training patients.
    """
    rng = np.random.default_rng(seed)
    counts = code_counts(train)
    codes = sorted(counts)
    if not codes:
        raise ValueError("the training split has no codes")
    weights = np.array([counts[c] for c in codes], dtype=np.float64)
    weights /= weights.sum()
    vpp = _visits_per_patient(train)
    cpv = _codes_per_visit(train)
    if demographics is None:
        demo_idx = rng.choice(len(train), n)
        demographics = [(train[i].age, train[i].sex) for i in demo_idx]
    elif len(demographics) != n:
        raise ValueError(f"{len(demographics)} demographics for {n} patients")
    n_visits = rng.choice(vpp, n)
    sizes = np.minimum(rng.choice(cpv, int(n_visits.sum())), len(codes))
    stream = np.empty(0, dtype=np.int64)
    pos = 0

    def draw() -> int:
        nonlocal stream, pos
        if pos >= stream.size:
            stream = rng.choice(len(codes), size=max(4096, 4 * int(sizes.sum())), p=weights)
            pos = 0
        pos += 1
        return int(stream[pos - 1])

    patients = []
    cursor = 0
    for i in range(n):
        visits = []
        for _ in range(int(n_visits[i])):
            size = int(sizes[cursor])
            cursor += 1
            chosen: dict[int, None] = {}
            tries = 0
            while len(chosen) < size:
                chosen.setdefault(draw(), None)
                tries += 1
                if tries > 50 * size + 100:  # a visit larger than the frequent codes allow
                    rest = rng.choice(len(codes), size, replace=False, p=weights)
                    chosen = dict.fromkeys(int(r) for r in rest)
                    break
            visits.append(tuple(codes[j] for j in chosen))
        age, sex = demographics[i]
        patients.append(Patient(f"baseline-{i}", float(age), sex, tuple(visits)))
    return patients


# -- targets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A protocol target on one metric of a row. ``kind`` says what ``value`` bounds:

    - ``"absolute"``: ``metric op value`` (``jsd <= 0.03``); with ``relative_to``, a bound
      relative to another metric of the same row (``exact_copy_rate <= exact_copy_rate_test
      + 0.02``).
    - ``"floor_ratio"``: ``metric op value x`` the floor row's value (``jsd <= 1.25 x floor``).
    - ``"floor_offset"``: ``metric op`` the floor row's value ``+ value``.
    - ``"gap_share"`` (for ``>=``): the metric closes at least the share ``value`` of the gap
      from the baseline row to the floor row: ``metric >= baseline + value x (floor -
      baseline)``; with ``slack`` > 0 a value within ``slack`` of the floor also passes (where
      the baseline is already at the floor, closing a share of no gap means nothing).

    The floor and baseline rows are those of the same run, passed to :meth:`check` as
    ``references``; without them a reference-relative target is not measured (None).
    """

    metric: str
    op: str  # ">=" or "<="
    value: float
    relative_to: str | None = None
    label: str = ""
    kind: str = "absolute"
    slack: float = 0.0

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.kind == "floor_ratio":
            return f"{self.op} {self.value:g}x floor"
        if self.kind == "floor_offset":
            return f"{self.op} floor {self.value:+g}"
        if self.kind == "gap_share":
            text = f">= {100 * self.value:g}% of baseline-to-floor gap"
            return text + (f" or floor - {self.slack:g}" if self.slack else "")
        if self.relative_to:
            return f"{self.op} {self.relative_to} + {self.value:g}"
        return f"{self.op} {self.value:g}"

    def bound(self, row: Mapping[str, float],
              references: Mapping[str, Mapping[str, float]] | None = None) -> float | None:
        """The number the metric is compared with, or None where a reference is missing."""

        def finite(source: Mapping[str, float] | None, key: str) -> float | None:
            value = None if source is None else source.get(key)
            return float(value) if isinstance(value, (int, float)) and np.isfinite(value) \
                else None

        if self.kind == "absolute":
            if self.relative_to is None:
                return self.value
            base = finite(row, self.relative_to)
            return None if base is None else base + self.value
        floor = finite((references or {}).get("floor"), self.metric)
        if floor is None:
            return None
        if self.kind == "floor_ratio":
            return self.value * floor
        if self.kind == "floor_offset":
            return floor + self.value
        if self.kind == "gap_share":
            baseline = finite((references or {}).get("baseline"), self.metric)
            if baseline is None:
                return None
            bound = baseline + self.value * (floor - baseline)
            return min(bound, floor - self.slack) if self.slack > 0 else bound
        raise ValueError(f"unknown target kind {self.kind!r}")

    def check(self, row: Mapping[str, float],
              references: Mapping[str, Mapping[str, float]] | None = None) -> bool | None:
        """True/False, or None when the row lacks the metric (or it is NaN) or a reference
        the target needs is missing."""
        value = row.get(self.metric)
        bound = self.bound(row, references)
        if bound is None or value is None or not np.isfinite(value):
            return None
        # A small tolerance so 0.99999999 passes ">= 1" only through rounding noise.
        return value >= bound - 1e-12 if self.op == ">=" else value <= bound + 1e-12


# The absolute targets on UCI's test split (kept under this name for its callers).
PROTOCOL_TARGETS: tuple[Target, ...] = (
    Target("jsd", "<=", 0.03),
    Target("top100_overlap", ">=", 0.80),
    Target("unigram_r2", ">=", 0.98),
    Target("bigram_r2", ">=", 0.90),
    Target("validity", ">=", 1.0, label="= 100%"),
    Target("validity_model_alone", ">=", 0.99, label=">= 99%"),
    Target("well_formed", ">=", 1.0, label="= 100%"),
    Target("exact_copy_rate", "<=", 0.02, relative_to="exact_copy_rate_test",
           label="<= real test + 2 pts"),
    Target("mia_auc", "<=", 0.60),
)

# Targets that hold on any corpus: fidelity judged against the floor and baseline of the same
# run. The share of the baseline-to-floor gap that R2s must close:
GAP_SHARE = 0.75
_SHARED_TARGETS: tuple[Target, ...] = (
    Target("validity", ">=", 1.0, label="= 100%"),
    Target("validity_model_alone", ">=", 0.99, label=">= 99%"),
    Target("well_formed", ">=", 1.0, label="= 100%"),
    Target("exact_copy_rate", "<=", 0.02, relative_to="exact_copy_rate_test",
           label="<= real test + 2 pts"),
    Target("mia_auc", "<=", 0.60),
    Target("tstr_auroc", ">=", -0.03, relative_to="tstr_auroc_real",
           label=">= train-on-real - 0.03"),
    Target("attr_inference_f1", "<=", 0.05, relative_to="attr_inference_f1_holdout",
           label="<= real holdout + 0.05"),
    Target("anonymeter_singling_out", "<=", 0.05),
    Target("anonymeter_linkability", "<=", 0.05),
    Target("anonymeter_inference", "<=", 0.05),
)
RELATIVE_TARGETS: tuple[Target, ...] = (
    Target("jsd", "<=", 1.25, kind="floor_ratio"),
    Target("top100_overlap", ">=", 0.9, kind="floor_ratio"),
    Target("unigram_r2", ">=", GAP_SHARE, kind="gap_share", slack=0.01),
    Target("bigram_r2", ">=", GAP_SHARE, kind="gap_share", slack=0.01),
    Target("sequential_r2", ">=", GAP_SHARE, kind="gap_share", slack=0.01),
    Target("tail_jsd", "<=", 1.25, kind="floor_ratio"),
    Target("tail_unigram_r2", ">=", GAP_SHARE, kind="gap_share", slack=0.01),
    Target("stratum_jsd_worst", "<=", 1.25, kind="floor_ratio"),
    Target("detection_auc", "<=", 0.10, kind="floor_offset"),
    *_SHARED_TARGETS,
)
# UCI's absolute numbers (DESIGN.md), with the goals for the newer metrics.
UCI_TARGETS: tuple[Target, ...] = (
    *PROTOCOL_TARGETS[:4],
    Target("detection_auc", "<=", 0.60),
    *_SHARED_TARGETS,
)
TARGET_PROFILES: dict[str, tuple[Target, ...]] = {"relative": RELATIVE_TARGETS,
                                                  "uci": UCI_TARGETS}


def gap_closed(value: float, floor: float, baseline: float) -> float:
    """Share of the baseline-to-floor gap a value closes: 0 at the baseline, 1 at the floor
    (negative below the baseline); NaN where the gap is 0 or a number is missing."""
    numbers = np.array([value, floor, baseline], dtype=np.float64)
    if not np.all(np.isfinite(numbers)) or floor == baseline:
        return float("nan")
    return float((value - baseline) / (floor - baseline))


def check_targets(row: Mapping[str, float], targets: Sequence[Target] = PROTOCOL_TARGETS,
                  references: Mapping[str, Mapping[str, float]] | None = None
                  ) -> dict[str, bool | None]:
    """Metric -> pass (True), fail (False) or not measured (None). ``references`` holds the
    run's ``floor`` and ``baseline`` rows, for the reference-relative targets."""
    return {t.metric: t.check(row, references) for t in targets}
