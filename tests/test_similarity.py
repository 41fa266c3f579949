"""The shared record comparison (app/similarity.py): exact-copy keys and nearest Jaccard."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from app.similarity import CodeSetIndex, nearest_jaccard_distance, visits_key


def _sets(rows: list[set[int]], n_cols: int) -> sp.csr_matrix:
    r = [i for i, s in enumerate(rows) for _ in s]
    c = [c for s in rows for c in sorted(s)]
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), n_cols))


def test_visits_key_ignores_code_order_and_repeats_but_not_visit_order():
    assert visits_key([["b", "a"], ["c"]]) == visits_key([["a", "b", "a"], ["c"]])
    assert visits_key([["a"], ["c"]]) != visits_key([["c"], ["a"]])
    assert visits_key([[3, 1]]) == ((1, 3),)


def test_nearest_on_a_known_example():
    base = _sets([{0, 1}, {2, 3}, {0, 1, 2, 3, 4}, {5}, {6}], 7)
    queries = _sets([{0, 1, 2, 3}, {6, 5}, {5}, {1}, set()], 7)
    distance, index = CodeSetIndex(base).nearest(queries)
    assert distance == pytest.approx([0.2, 0.5, 0.0, 0.5, 1.0])
    # {5, 6} is 0.5 from {5} and from {6}: the first wins; nothing shared: index 0
    assert index.tolist() == [2, 3, 3, 0, 0]


def test_empty_sets_and_no_base():
    base = _sets([{1}, set()], 3)
    assert CodeSetIndex(base).nearest(_sets([set(), {2}], 3))[0].tolist() == [0.0, 1.0]
    assert CodeSetIndex(base).nearest(_sets([set()], 3))[1].tolist() == [1]
    assert nearest_jaccard_distance(_sets([{1}], 3), _sets([], 3)).tolist() == [1.0]


@pytest.mark.parametrize("block_elements", [1, 7, 1 << 23])
def test_dense_and_sparse_blocks_agree_with_brute_force(block_elements: int):
    rng = np.random.default_rng(0)
    # a few common codes make some blocks dense, rare ones keep others sparse
    weights = 1.0 / np.arange(1, 41) ** 1.5
    draw = [set(rng.choice(40, int(rng.integers(0, 6)), p=weights / weights.sum()))
            for _ in range(90)]
    base, queries = draw[:50], draw[50:]
    distance, index = CodeSetIndex(_sets(base, 40)).nearest(_sets(queries, 40), block_elements)
    for q, d, i in zip(queries, distance, index, strict=True):
        each = [0.0 if not (q | b) else 1 - len(q & b) / len(q | b) for b in base]
        assert d == pytest.approx(min(each), abs=1e-12)
        assert i == each.index(min(each))
