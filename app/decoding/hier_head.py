"""The hierarchical output head's normalisation in numpy, over contiguous segments.

The exported hierarchical decoder graphs stop before the segment log-sum-exps (ONNX has no
segment reduction; the ``ScatterElements`` formulation cost about a third of the step in ONNX
Runtime) and return the head's levels, unnormalised:

* ``top_log_probs [B, n_special + n_chapters]``: log-softmax over the structure tokens and the
  chapters (already normalised in the graph: a small dense softmax),
* ``category_logits [B, n_categories]`` with their row maximum ``category_max [B, 1]`` and
  ``category_exp = exp(category_logits - category_max)`` transposed (``[n_categories, B]``),
* ``code_logits [B, n_codes]``, ``code_max``, ``code_exp`` likewise (the exponentials are
  ONNX Runtime's, vectorised; only the segment sums and the final gather are numpy's).

:class:`HierarchicalHead` turns them into the flat log-probabilities of
:meth:`training.model.HierBart.output_log_probs` (``log P(chap) + log P(cat | chap) + log P(code |
cat)`` for code tokens, the top level's values for structure tokens).

It relies on the vocabulary's order (:class:`app.vocab.Vocabulary` sorts codes, and a category
is a prefix of its codes): the codes of one category are **contiguous** in token order, and so
are the categories of one chapter (chapters need not be in increasing order: ``E`` sorts before
``V``). :func:`contiguous_segments` checks this and raises otherwise. Segment sums are then a
sparse 0/1 matrix product (CSR x dense; ``np.add.reduceat`` measured 3-10x slower), and runs
expand back with ``np.repeat``; no scatter. Each segment's log-sum-exp is shifted by the row
maximum; a segment lying so far below it that its sum would leave float32's
normal range is recomputed with its own maximum, so the result is exact per segment.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HierarchicalHead", "contiguous_segments"]

_TINY = np.float32(1e-30)  # below this a shifted segment sum is recomputed with its own max


def contiguous_segments(parent: np.ndarray, what: str = "segment ids",
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, lengths, ids)`` of the runs of equal values of ``parent``.

    Raises ``ValueError`` where one value forms more than one run (the segments would not be
    contiguous, and the reductions here would be wrong).
    """
    parent = np.asarray(parent, dtype=np.int64)
    if parent.ndim != 1 or parent.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-d array")
    starts = np.r_[0, np.flatnonzero(np.diff(parent)) + 1]
    ids = parent[starts]
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{what}: members of a parent are not contiguous (the vocabulary must "
                         "list codes sorted, so each category's codes and each chapter's "
                         "categories form one run)")
    lengths = np.diff(np.r_[starts, parent.size])
    return starts, lengths, ids


class _Segments:
    """Log-sum-exp over contiguous column segments of a ``[B, n]`` array."""

    def __init__(self, parent: np.ndarray, what: str) -> None:
        import scipy.sparse as sp

        self.starts, self.lengths, self.ids = contiguous_segments(parent, what)
        n, k = int(np.asarray(parent).size), int(self.starts.size)
        run = np.repeat(np.arange(k), self.lengths)
        # [k, n] 0/1 matrix: member_t @ x.T sums each run (CSR x dense, no scatter)
        self.member_t = sp.csr_matrix((np.ones(n, np.float32), (run, np.arange(n))),
                                      shape=(k, n))
        self.run = run  # column -> run

    def logsumexp(self, x: np.ndarray, peak: np.ndarray | None = None,
                  shifted_exp_t: np.ndarray | None = None) -> np.ndarray:
        """``[B, k]`` log-sum-exp of each run (runs in order of appearance).

        ``peak`` (``[B, 1]`` row maxima) and ``shifted_exp_t`` (``exp(x - peak)`` transposed,
        ``[n, B]`` C-contiguous: CSR x dense runs fast on it) may come precomputed (the exported
        graphs compute them, with ONNX Runtime's vectorised exp).
        """
        if peak is None or shifted_exp_t is None:
            peak = x.max(axis=1, keepdims=True)
            shifted_exp_t = np.exp(x - peak).T.copy()
        total = np.asarray(self.member_t @ shifted_exp_t).T  # [B, k]
        with np.errstate(divide="ignore"):
            lse = np.log(total) + peak
        small = total < _TINY
        if small.any():  # a run far below the row's peak: recompute with its own max
            for r, g in zip(*np.nonzero(small), strict=True):
                lo = self.starts[g]
                seg = x[r, lo: lo + self.lengths[g]]
                m = seg.max()
                lse[r, g] = m + np.log(np.exp(seg - m).sum())
        return lse


class HierarchicalHead:
    """Flat log-probabilities ``[B, V]`` from the three levels (see the module docstring)."""

    def __init__(self, n_special: int, code_category: np.ndarray,
                 category_chapter: np.ndarray) -> None:
        self.n_special = int(n_special)
        self.code_category = np.asarray(code_category, dtype=np.int64)
        self.category_chapter = np.asarray(category_chapter, dtype=np.int64)
        self.n_codes = self.code_category.size
        self.n_categories = self.category_chapter.size
        self.codes = _Segments(self.code_category, "code -> category")
        self.cats = _Segments(self.category_chapter, "category -> chapter")
        if self.code_category.max() >= self.n_categories:
            raise ValueError("code -> category ids exceed the number of categories")

    @property
    def vocab_size(self) -> int:
        return self.n_special + self.n_codes

    def log_probs(self, top: np.ndarray, category_logits: np.ndarray,
                  category_max: np.ndarray | None, category_exp: np.ndarray | None,
                  code_logits: np.ndarray, code_max: np.ndarray | None = None,
                  code_exp: np.ndarray | None = None) -> np.ndarray:
        """Flat ``[B, V]`` log-probabilities; ``*_max`` / ``*_exp``: row maxima of the level's
        logits and ``exp(logits - max)`` transposed, ``[n, B]`` (``None``: computed here)."""
        ns = self.n_special
        cats, codes = self.cats, self.codes
        # log P(cat) = log P(chap) + cat_logit - lse_chap(cat_logits); runs expand by np.repeat
        # (contiguous runs: much cheaper than a fancy-index gather along axis 1)
        cat_lse = cats.logsumexp(category_logits, category_max, category_exp)
        chapter_off = top[:, ns + cats.ids] - cat_lse  # [B, chapter runs]
        cat_lp = category_logits + np.repeat(chapter_off, cats.lengths, axis=1)
        # per code run (one category): log P(cat) - lse_cat(code_logits)
        code_lse = codes.logsumexp(code_logits, code_max, code_exp)
        offset = cat_lp[:, codes.ids] - code_lse  # [B, category runs]
        out = np.empty((top.shape[0], ns + self.n_codes), dtype=np.float32)
        out[:, :ns] = top[:, :ns]
        np.add(code_logits, np.repeat(offset, codes.lengths, axis=1), out=out[:, ns:])
        return out
