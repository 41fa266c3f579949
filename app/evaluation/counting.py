"""How the protocol counts (DESIGN.md, "Evaluation protocol"): code columns, incidence
matrices and per-patient / per-visit tallies every other evaluation module builds on.

Counting
    A visit is a set of codes (a code counts once per visit). The *frequency* of a code is the
    number of visits that contain it; its *per-visit prevalence* is that count over the number
    of visits. The *pair prevalence* of an unordered pair {a, b} (a != b) is the share of visits
    containing both. Pair statistics come from a sparse visits x codes incidence matrix X as the
    strict upper triangle of X'X, never a dense codes x codes array.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from app.corpus import Patient

__all__ = [
    "CodeIndex",
    "code_counts",
    "codes_per_visit",
    "column_counts",
    "pair_counts",
    "patient_matrix",
    "visit_matrix",
    "visits_per_patient",
    "widen",
    "widen_square",
]


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


def widen(matrix: sp.spmatrix, n_cols: int) -> sp.csr_matrix:
    """The same matrix with extra all-zero columns up to ``n_cols`` (for a grown index)."""
    matrix = matrix.tocsr()
    if matrix.shape[1] == n_cols:
        return matrix
    return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr),
                         shape=(matrix.shape[0], n_cols))


def widen_square(matrix: sp.spmatrix, n: int) -> sp.csr_matrix:
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


def column_counts(visits: sp.spmatrix) -> np.ndarray:
    return np.asarray(visits.sum(axis=0)).ravel().astype(np.float64)


def code_counts(patients: Iterable[Patient]) -> Counter:
    """Code -> number of visits containing it."""
    return Counter(c for p in patients for v in p.visits for c in set(v))


def visits_per_patient(patients: Sequence[Patient]) -> np.ndarray:
    return np.array([len(p.visits) for p in patients], dtype=np.int64)


def codes_per_visit(patients: Sequence[Patient]) -> np.ndarray:
    return np.array([len(set(v)) for p in patients for v in p.visits], dtype=np.int64)
