"""The visit-level code co-occurrence matrix: a first-class artifact of the training split.

``C[i, j]`` is the number of training visits that contain both code ``i`` and code ``j``
(indices are :meth:`app.vocab.Vocabulary.code_id`), symmetric with a zero diagonal, stored as
``scipy.sparse`` CSR. On disk it is ``cooccurrence.npz`` written by
:func:`scipy.sparse.save_npz` (int32 counts); the code order is the vocabulary's, whose file
lies beside it in a bundle.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from app.corpus import Patient
from app.vocab import Vocabulary

__all__ = ["build_cooccurrence", "load_cooccurrence", "save_cooccurrence", "visit_incidence"]


def visit_incidence(patients: Iterable[Patient], vocab: Vocabulary) -> sp.csr_matrix:
    """Binary visits x codes CSR matrix; codes outside the vocabulary are ignored."""
    indptr, indices = [0], []
    offset = vocab.n_special
    for patient in patients:
        for visit in patient.visits:
            ids = {vocab.index[c] - offset for c in visit if c in vocab.index}
            indices.extend(sorted(ids))
            indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.int32)
    return sp.csr_matrix((data, np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
                         shape=(len(indptr) - 1, vocab.n_codes))


def build_cooccurrence(patients: Iterable[Patient], vocab: Vocabulary) -> sp.csr_matrix:
    """Symmetric code x code counts of shared visits (zero diagonal) from ``patients``."""
    incidence = visit_incidence(patients, vocab)
    counts = (incidence.T @ incidence).tocsr()
    counts.setdiag(0)
    counts.eliminate_zeros()
    return counts.astype(np.int32)


def save_cooccurrence(matrix: sp.csr_matrix, path: str | Path) -> None:
    sp.save_npz(path, matrix.tocsr(), compressed=True)


def load_cooccurrence(path: str | Path, vocab: Vocabulary | None = None) -> sp.csr_matrix:
    """Load a matrix; with ``vocab``, check its shape matches the vocabulary's codes."""
    matrix = sp.load_npz(path).tocsr()
    if vocab is not None and matrix.shape != (vocab.n_codes, vocab.n_codes):
        raise ValueError(f"{path}: co-occurrence shape {matrix.shape} does not match "
                         f"{vocab.n_codes} vocabulary codes")
    return matrix
