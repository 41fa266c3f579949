"""How close a record is to another: the one definition the privacy guard and the metrics share.

Exact copy (:func:`visits_key`)
    A record is its visits in order, each visit taken as a set of codes; demographics and ids
    are ignored. Two records are exact copies when their keys are equal. Codes may be strings
    (the metrics) or vocabulary ids (the ``retrieve_edit`` guard).

Nearest Jaccard distance (:class:`CodeSetIndex`, :func:`nearest_jaccard_distance`)
    Rows of a sparse matrix are code sets (any non-zero entry is a member). For each query row
    the smallest Jaccard distance ``1 - |A n B| / |A u B|`` to a base row, and which base row
    (the lowest index on ties). Intersections come from sparse products, so only base rows
    sharing a code with the query are touched; queries go in blocks, so memory stays near
    ``block_elements`` entries. A query sharing no code with any base row is at distance 1
    (index 0); two empty sets are at distance 0; with no base rows every distance is 1.
    Arithmetic is float64 throughout.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np
import scipy.sparse as sp

__all__ = ["CodeSetIndex", "nearest_jaccard_distance", "visits_key"]


def visits_key(visits: Iterable[Iterable[Hashable]]) -> tuple[tuple, ...]:
    """The exact-copy key of a record: its visits in order, each as its sorted set of codes."""
    return tuple(tuple(sorted(set(v))) for v in visits)


def _binary(matrix: sp.spmatrix, n_cols: int) -> sp.csr_matrix:
    """``matrix`` as a float64 0/1 CSR of ``n_cols`` columns (extra columns all zero)."""
    m = sp.csr_matrix(matrix, dtype=np.float64)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.data[:] = 1.0
    if m.shape[1] < n_cols:
        m = sp.csr_matrix((m.data, m.indices, m.indptr), shape=(m.shape[0], n_cols))
    return m


class CodeSetIndex:
    """Base code sets (rows of a binary matrix), searched for the nearest by Jaccard distance.

    Built once and queried many times (the guard queries each batch of candidates against the
    training patients). A query's columns are the base's; columns past them are codes no base
    row holds.
    """

    def __init__(self, base: sp.spmatrix) -> None:
        self.base = _binary(base, base.shape[1])
        self.sizes = np.asarray(self.base.sum(axis=1), dtype=np.float64).ravel()
        self._base_t = self.base.T.tocsr()
        self._holders = np.diff(self._base_t.indptr)  # base rows holding each code
        empty = np.flatnonzero(self.sizes == 0)
        self._first_empty = int(empty[0]) if empty.size else None

    def __len__(self) -> int:
        return int(self.base.shape[0])

    def distance(self, queries: sp.spmatrix, block_elements: int = 1 << 23) -> np.ndarray:
        """The distance from each query row to its nearest base row."""
        return self._search(queries, block_elements, with_index=False)[0]

    def nearest(self, queries: sp.spmatrix, block_elements: int = 1 << 23
                ) -> tuple[np.ndarray, np.ndarray]:
        """``(distance, index)`` of each query row's nearest base row."""
        return self._search(queries, block_elements, with_index=True)

    def _search(self, queries: sp.spmatrix, block_elements: int, with_index: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        q = _binary(queries, max(queries.shape[1], self.base.shape[1]))
        q_size = np.asarray(q.sum(axis=1), dtype=np.float64).ravel()
        q = q[:, :self.base.shape[1]]  # intersections need only the base's columns
        nq, nb = q.shape[0], len(self)
        distance = np.ones(nq, dtype=np.float64)
        index = np.zeros(nq, dtype=np.int64)
        if nq == 0 or nb == 0:
            return distance, index
        step = max(1, block_elements // nb)
        for start in range(0, nq, step):
            block, sizes = q[start:start + step], q_size[start:start + step]
            # products the intersections take: past a quarter of the block x base array a
            # dense block is the faster; both give the same numbers
            terms = int(self._holders[block.indices].sum())
            near = self._dense if 4 * terms > block.shape[0] * nb else self._sparse
            rows = slice(start, start + block.shape[0])
            distance[rows], index[rows] = near(block, sizes, with_index)
        if self._first_empty is not None:
            empty = q_size == 0
            distance[empty], index[empty] = 0.0, self._first_empty
        return distance, index

    def _sparse(self, block: sp.csr_matrix, sizes: np.ndarray, with_index: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        distance = np.ones(block.shape[0], dtype=np.float64)
        index = np.zeros(block.shape[0], dtype=np.int64)
        shared = (block @ self._base_t).tocsr()  # queries x the base rows sharing a code
        shared.sort_indices()
        per_row = np.diff(shared.indptr)
        touched = np.flatnonzero(per_row)
        if touched.size == 0:
            return distance, index
        rows = np.repeat(np.arange(block.shape[0]), per_row)
        union = sizes[rows] + self.sizes[shared.indices] - shared.data
        dist = 1.0 - shared.data / union
        distance[touched] = np.minimum.reduceat(dist, shared.indptr[touched])
        if with_index:  # each row's first entry at its minimum: columns are sorted in a row
            at_best = np.flatnonzero(dist == distance[rows])
            _, first = np.unique(rows[at_best], return_index=True)
            index[touched] = shared.indices[at_best[first]]
        return distance, index

    def _dense(self, block: sp.csr_matrix, sizes: np.ndarray, with_index: bool
               ) -> tuple[np.ndarray, np.ndarray]:
        codes_by_query = np.ascontiguousarray(block.toarray().T)
        sim = np.asarray(self.base @ codes_by_query, dtype=np.float64)  # base x queries
        union = np.add.outer(self.sizes, sizes)
        union -= sim
        np.maximum(union, 1.0, out=union)  # two empty sets: left at 1 here, fixed by _search
        np.divide(sim, union, out=sim)
        if not with_index:  # 1 - x is monotone in floats too: 1 - max(sim) is min(1 - sim)
            return 1.0 - sim.max(axis=0), np.zeros(block.shape[0], dtype=np.int64)
        dist = np.subtract(1.0, sim, out=sim)
        distance = dist.min(axis=0)
        return distance, np.argmax(dist == distance[None, :], axis=0).astype(np.int64)


def nearest_jaccard_distance(queries: sp.spmatrix, base: sp.spmatrix,
                             block_elements: int = 1 << 23) -> np.ndarray:
    """For each row of binary ``queries``, the smallest Jaccard distance to a row of binary
    ``base`` (same columns; the narrower one is widened with empty columns)."""
    n_cols = max(queries.shape[1], base.shape[1])
    index = CodeSetIndex(_binary(base, n_cols))
    return index.distance(queries, block_elements)
