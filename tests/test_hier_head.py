"""The numpy hierarchical head: exact per-segment normalisation over contiguous segments."""

from __future__ import annotations

import numpy as np
import pytest

from app.decoding.hier_head import HierarchicalHead, contiguous_segments


def _reference(top, cat_logits, code_logits, code_category, category_chapter, ns):
    """log P(chap) + log P(cat | chap) + log P(code | cat), one segment at a time."""
    def seg_lse(x, parent):
        out = np.empty_like(x)
        for p in np.unique(parent):
            cols = parent == p
            m = x[:, cols].max(axis=1, keepdims=True)
            out[:, cols] = m + np.log(np.exp(x[:, cols] - m).sum(axis=1, keepdims=True))
        return out
    x64 = [a.astype(np.float64) for a in (top, cat_logits, code_logits)]
    cat_lp = x64[1] - seg_lse(x64[1], category_chapter) + x64[0][:, ns + category_chapter]
    code_lp = x64[2] - seg_lse(x64[2], code_category) + cat_lp[:, code_category]
    return np.concatenate([x64[0][:, :ns], code_lp], axis=1)


def test_matches_a_per_segment_reference_even_far_below_the_row_peak() -> None:
    rng = np.random.default_rng(0)
    ns = 6
    # chapters contiguous but not increasing (E sorts before V), a category with no codes
    category_chapter = np.array([0, 0, 1, 1, 1, 3, 3, 2, 2])
    code_category = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 7, 7, 8])
    batch = 5
    top = rng.standard_normal((batch, ns + 4)).astype(np.float32)
    top -= np.log(np.exp(top).sum(axis=1, keepdims=True))
    cat_logits = (rng.standard_normal((batch, category_chapter.size)) * 3).astype(np.float32)
    code_logits = (rng.standard_normal((batch, code_category.size)) * 3).astype(np.float32)
    code_logits[1, 3] -= 300.0  # category 1's only code: exp underflows against the row max
    code_logits[2, 11:13] -= 200.0  # a whole category far below
    head = HierarchicalHead(ns, code_category, category_chapter)
    got = head.log_probs(top, cat_logits, None, None, code_logits)
    want = _reference(top, cat_logits, code_logits, code_category, category_chapter, ns)
    assert got.shape == (batch, ns + code_category.size) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4
    # precomputed maxima and transposed exponentials (what the graphs return) agree
    cm = cat_logits.max(axis=1, keepdims=True)
    xm = code_logits.max(axis=1, keepdims=True)
    again = head.log_probs(top, cat_logits, cm, np.exp(cat_logits - cm).T.copy(), code_logits,
                           xm, np.exp(code_logits - xm).T.copy())
    assert np.abs(again - want).max() < 1e-4


def test_non_contiguous_segments_are_refused() -> None:
    starts, lengths, ids = contiguous_segments(np.array([2, 2, 0, 1, 1]))
    assert starts.tolist() == [0, 2, 3] and lengths.tolist() == [2, 1, 2]
    assert ids.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="not contiguous"):
        contiguous_segments(np.array([0, 1, 0]))
