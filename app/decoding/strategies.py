"""Train co-occurrence statistics as decoding uses them: a sparse step bias and a coherence score.

``C`` is the visit-level co-occurrence CSR of :mod:`app.cooccurrence` (code ids, not token ids).

* :class:`CooccurrenceBias` keeps, per batch row, ``acc[c] = sum_j C[j, c]`` over the codes ``j``
  already in the current visit. Adding code ``j`` adds the ``nnz(C[j])`` stored entries of row
  ``j`` only, so a step costs the nonzeros of the codes just emitted, never ``V x V``; the logit
  bias is ``alpha * log(1 + acc)``. With ``normalize`` each count ``C[j, c]`` is divided by code
  ``j``'s training visit count, so ``acc[c]`` sums conditional frequencies ``P(c | j)``. With the
  ``npmi`` bias ``acc[c]`` sums the positive part of ``NPMI(j, c)`` instead and the bias is
  ``alpha`` times its mean over the visit's codes: in ``[0, alpha]`` whatever the codes'
  frequencies, so a common code does not pull harder than a rare one.
* :meth:`CooccurrenceStats.coherence` is the mean normalised pointwise mutual information
  (NPMI, Bouma 2009) of a patient's within-visit code pairs:
  ``log(p_ij / (p_i p_j)) / -log p_ij`` with probabilities over training visits; a pair never
  seen together scores -1, a pair always seen together +1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from app.vocab import Vocabulary

__all__ = ["CooccurrenceBias", "CooccurrenceStats"]


class CooccurrenceStats:
    """Counts of the training split: pair counts ``C``, code visit counts and the visit total."""

    def __init__(self, matrix: sp.csr_matrix, code_counts: np.ndarray, n_visits: int | None = None,
                 n_special: int = 6) -> None:
        self.matrix = sp.csr_matrix(matrix)
        self.matrix.sort_indices()
        self.code_counts = np.asarray(code_counts, dtype=np.float64)
        if self.matrix.shape != (self.code_counts.size, self.code_counts.size):
            raise ValueError(f"co-occurrence shape {self.matrix.shape} does not match "
                             f"{self.code_counts.size} code counts")
        # Without the visit total, bound it by the code occurrences (visits have >= 1 code).
        self.n_visits = float(n_visits if n_visits else max(1.0, self.code_counts.sum()))
        self.n_special = n_special
        self.indptr = self.matrix.indptr.astype(np.int64)
        self.indices = self.matrix.indices.astype(np.int64)
        self.data = self.matrix.data.astype(np.float32)
        self._positive_npmi: np.ndarray | None = None

    @property
    def positive_npmi(self) -> np.ndarray:
        """``max(NPMI(i, j), 0)`` of every stored pair, aligned with :attr:`data` (made once)."""
        if self._positive_npmi is None:
            rows = np.repeat(np.arange(self.matrix.shape[0]), np.diff(self.indptr))
            values = self._npmi_of(self.matrix.data.astype(np.float64), rows, self.indices)
            self._positive_npmi = np.maximum(values, 0.0).astype(np.float32)
        return self._positive_npmi

    @classmethod
    def from_vocab(cls, matrix: sp.csr_matrix, vocab: Vocabulary,
                   n_visits: int | None = None) -> CooccurrenceStats:
        return cls(matrix, vocab.counts, n_visits, vocab.n_special)

    # -- scores of finished patients ----------------------------------------------------------
    def pair_counts(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``C[a, b]`` for code-id arrays ``a`` and ``b``."""
        if len(a) == 0:
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self.matrix[np.asarray(a), np.asarray(b)], dtype=np.float64).ravel()

    def npmi(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """NPMI of the code pairs ``(a[i], b[i])`` over training visits, in ``[-1, 1]``."""
        return self._npmi_of(self.pair_counts(a, b), a, b)

    def _npmi_of(self, counts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        n = self.n_visits
        with np.errstate(divide="ignore", invalid="ignore"):
            p_ab = counts / n
            pmi = np.log(p_ab) - np.log(self.code_counts[a] / n) - np.log(self.code_counts[b] / n)
            out = pmi / -np.log(p_ab)
        out[counts <= 0] = -1.0
        out[p_ab >= 1.0] = 1.0
        return np.clip(out, -1.0, 1.0)

    @staticmethod
    def _pairs(visits: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        a, b = [], []
        for visit in visits:
            for i in range(len(visit)):
                for j in range(i + 1, len(visit)):
                    a.append(visit[i])
                    b.append(visit[j])
        return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)

    def coherence(self, visits: Sequence[Sequence[int]]) -> float:
        """Mean NPMI of within-visit pairs (code ids); 0 for a patient without pairs."""
        a, b = self._pairs(visits)
        return float(self.npmi(a, b).mean()) if a.size else 0.0

    def coherence_many(self, patients: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
        """:meth:`coherence` of many patients with one sparse lookup."""
        a, b, owner = [], [], []
        for i, visits in enumerate(patients):
            pa, pb = self._pairs(visits)
            a.append(pa)
            b.append(pb)
            owner.append(np.full(pa.size, i, dtype=np.int64))
        if not patients:
            return np.zeros(0)
        a_all, b_all, who = np.concatenate(a), np.concatenate(b), np.concatenate(owner)
        n = len(patients)
        sums = np.bincount(who, weights=self.npmi(a_all, b_all), minlength=n)
        counts = np.bincount(who, minlength=n)
        return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)

    def visit_score(self, visits: Sequence[Sequence[int]]) -> float:
        """Mean over visits of the summed train count of the visit's code pairs."""
        if not visits:
            return 0.0
        totals = [self.pair_counts(*self._pairs([v])).sum() for v in visits]
        return float(np.mean(totals))


class CooccurrenceBias:
    """Per-row running co-occurrence sums of the current visit and the logit bias they give."""

    def __init__(self, stats: CooccurrenceStats, batch: int, vocab_size: int,
                 alpha: float, normalize: bool = False, kind: str = "count") -> None:
        if kind not in ("count", "npmi"):
            raise ValueError(f"co-occurrence bias {kind!r}: use count or npmi")
        self.stats = stats
        self.alpha = np.float32(alpha)
        self.normalize = normalize
        self.kind = kind
        self.acc = np.zeros((batch, stats.code_counts.size), dtype=np.float32)
        self.bias = np.zeros((batch, vocab_size), dtype=np.float32)
        self.in_visit = np.zeros(batch, dtype=np.float32)  # codes so far in the current visit
        self.offset = stats.n_special

    def add(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Rows ``rows`` just emitted code tokens ``tokens`` (one per row)."""
        if rows.size == 0:
            return
        st = self.stats
        codes = tokens - self.offset
        starts, ends = st.indptr[codes], st.indptr[codes + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        self.in_visit[rows] += 1.0
        if self.kind == "npmi":
            # the mean over the visit's codes changes on every column of the row
            if total:
                flat, row_rep = self._entries(starts, lengths, rows, total)
                self.acc[row_rep, st.indices[flat]] += st.positive_npmi[flat]
            end = self.offset + self.acc.shape[1]
            self.bias[rows, self.offset:end] = (
                self.alpha * self.acc[rows] / self.in_visit[rows, None])
            return
        if total == 0:
            return
        flat, row_rep = self._entries(starts, lengths, rows, total)
        cols = st.indices[flat]
        # (row, col) pairs are unique: one code per row per call, CSR rows have unique columns.
        values = st.data[flat]
        if self.normalize:
            values = values / np.maximum(st.code_counts[np.repeat(codes, lengths)], 1.0).astype(
                np.float32)
        self.acc[row_rep, cols] += values
        self.bias[row_rep, cols + self.offset] = self.alpha * np.log1p(self.acc[row_rep, cols])

    @staticmethod
    def _entries(starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray,
                 total: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions in the CSR arrays of the rows' stored entries, and the batch row of each."""
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        flat = np.repeat(starts, lengths) + (np.arange(total) - first)
        return flat, np.repeat(rows, lengths)

    def reset(self, rows: np.ndarray) -> None:
        """Rows ``rows`` closed their visit."""
        if rows.size:
            self.acc[rows] = 0.0
            self.bias[rows] = 0.0
            self.in_visit[rows] = 0.0

    def take(self, rows: np.ndarray) -> None:
        self.acc = self.acc[rows]
        self.bias = self.bias[rows]
        self.in_visit = self.in_visit[rows]
