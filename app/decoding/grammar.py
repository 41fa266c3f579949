"""The batch grammar state machine: every output is ``<s> (<v> code+ </v>)+ </s>``.

One :class:`Grammar` holds the limits; one :class:`GrammarState` holds, per batch row, where the
row is in the grammar. :meth:`Grammar.allowed` gives the ``[B, V]`` boolean mask of tokens that
keep the sequence well formed, and :meth:`Grammar.advance` moves the state by the emitted
tokens. Guarantees, by construction, for any model output:

* the sequence starts ``<s> <v>``; inside a visit come codes, and ``</v>`` only after at least
  one code; after ``</v>`` either ``<v>`` or ``</s>``;
* no code repeats inside a visit;
* at most ``max_visits`` visits and ``max_codes`` codes per visit (``</v>`` is forced when a
  visit is full, ``</s>`` when the visits are used up) and at most ``max_length`` tokens in all
  (``<s>`` and ``</s>`` included): a code or a visit is only allowed while the tokens left can
  still close the sequence, so it always ends;
* every required code (``must_include``) is emitted: ``</s>`` is refused while one is missing,
  and when the remaining code slots only just fit the missing codes, only those are allowed.

``code_ok`` (per row) restricts which codes may be sampled at all (the validity mask); required
codes are always allowed, so callers must check beforehand that they are acceptable.

``rolling=True`` (a bundle trained on windows of long patients, :mod:`app.windows`): a row
with no required code left is not held to ``max_length``; it may fill the window and go on in
the next one, exactly as a training window is the first ``max_length`` tokens of a longer
patient. The engine stops decoding a window at ``max_length`` tokens and rolls such a row over.
Rows with required codes missing, or whose open visit holds one, keep the length rule, so those
codes are placed in visits the first window keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.vocab import BOS, END_VISIT, EOS, PAD, SPECIAL_TOKENS, VISIT

__all__ = ["AFTER_VISIT", "DONE", "IN_VISIT", "START", "Grammar", "GrammarState"]

START, IN_VISIT, AFTER_VISIT, DONE = 0, 1, 2, 3
_IDS = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
PAD_ID, BOS_ID, EOS_ID = _IDS[PAD], _IDS[BOS], _IDS[EOS]
VISIT_ID, END_VISIT_ID = _IDS[VISIT], _IDS[END_VISIT]
N_SPECIAL = len(SPECIAL_TOKENS)


@dataclass
class GrammarState:
    """Per-row position in the grammar (all arrays have the batch as first axis)."""

    phase: np.ndarray  # int8 [B]: START (after <s>), IN_VISIT, AFTER_VISIT, DONE
    n_visits: np.ndarray  # int32 [B]: visits opened so far
    n_codes: np.ndarray  # int32 [B]: codes in the current visit
    used: np.ndarray  # bool [B, V]: tokens emitted in the current visit
    missing: np.ndarray  # bool [B, V]: required codes not yet emitted
    n_missing: np.ndarray  # int32 [B]
    length: np.ndarray  # int32 [B]: tokens emitted so far, <s> included
    # bool [B]: the open visit holds a required code (rolling: it must close in the window)
    pinned: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> GrammarState:
        return GrammarState(self.phase[rows], self.n_visits[rows], self.n_codes[rows],
                            self.used[rows], self.missing[rows], self.n_missing[rows],
                            self.length[rows], None if self.pinned is None else self.pinned[rows])

    @property
    def done(self) -> np.ndarray:
        return self.phase == DONE


@dataclass(frozen=True)
class Grammar:
    vocab_size: int
    max_visits: int
    max_codes: int
    max_length: int = 0  # 0: the visit and code limits alone (2 + max_visits x (max_codes + 2))
    rolling: bool = False  # rows without missing required codes may run past max_length
    # a model trained on a fixed in-visit code order (app.vocab.code_rank) never saw a code
    # follow one of a higher rank: after a code, codes ranked at or before it are ruled out
    # for the rest of the visit (codes still required are not)
    code_rank: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_visits < 1 or self.max_codes < 1:
            raise ValueError("max_visits and max_codes must be at least 1")
        if self.vocab_size <= N_SPECIAL:
            raise ValueError("the vocabulary has no codes")
        bound = 2 + self.max_visits * (self.max_codes + 2)
        if self.max_length == 0 or self.max_length > bound:
            object.__setattr__(self, "max_length", bound)
        if self.max_length < 5:
            raise ValueError("max_length must be at least 5 (<s> <v> code </v> </s>)")

    # -- tokens needed to finish (vectorised) -------------------------------------------------
    def _need_in_visit(self, k: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Fewest tokens that close a row inside a visit with ``k`` codes, ``m`` codes missing."""
        spill = np.maximum(0, m - (self.max_codes - k))
        extra = np.where((k == 0) & (m == 0), 1, 0)
        return m + 2 + 2 * (-(-spill // self.max_codes)) + extra

    def _need_after_visit(self, m: np.ndarray) -> np.ndarray:
        """Fewest tokens that close a row after ``</v>`` with ``m`` codes missing."""
        return np.where(m == 0, 1, m + 2 * (-(-m // self.max_codes)) + 1)

    def check_feasible(self, n_required: np.ndarray) -> np.ndarray:
        """Bool per row: can ``n_required`` codes fit the visit, code and length limits?"""
        n_required = np.asarray(n_required, dtype=np.int64)
        fits_slots = n_required <= self.max_visits * self.max_codes
        fits_length = 2 + self._need_in_visit(np.zeros_like(n_required), n_required) \
            <= self.max_length
        return fits_slots & fits_length

    def initial(self, required: np.ndarray,
                n_visits: np.ndarray | None = None) -> GrammarState:
        """State after ``<s>`` for rows whose required codes are ``required`` (bool [B, V]);
        ``n_visits``: visits the rows already have (a rolling continuation window)."""
        required = np.asarray(required, dtype=bool)
        batch = required.shape[0]
        n_missing = required.sum(axis=1).astype(np.int32)
        if not self.check_feasible(n_missing).all():
            raise ValueError("more required codes than the visit, code and length limits hold")
        return GrammarState(
            phase=np.full(batch, START, dtype=np.int8),
            n_visits=(np.zeros(batch, dtype=np.int32) if n_visits is None
                      else np.asarray(n_visits, dtype=np.int32).copy()),
            n_codes=np.zeros(batch, dtype=np.int32),
            used=np.zeros((batch, self.vocab_size), dtype=bool),
            missing=required.copy(),
            n_missing=n_missing,
            length=np.ones(batch, dtype=np.int32),
            pinned=np.zeros(batch, dtype=bool),
        )

    def allowed(self, state: GrammarState, code_ok: np.ndarray) -> np.ndarray:
        """Bool ``[B, V]``: tokens each row may emit next. ``code_ok`` is bool ``[B, V]``."""
        phase, nv, nc, nm = state.phase, state.n_visits, state.n_codes, state.n_missing
        left = self.max_length - state.length  # tokens this row may still emit
        batch = phase.shape[0]
        allowed = np.zeros((batch, self.vocab_size), dtype=bool)
        rows = np.flatnonzero(phase == IN_VISIT)
        if rows.size:
            k, m, r = nc[rows], nm[rows], left[rows]
            later = (self.max_visits - nv[rows]) * self.max_codes  # slots after this visit
            room = k < self.max_codes
            # A code that is not required must leave slots and tokens for the missing ones.
            fits = self._need_in_visit(k + 1, m) <= r - 1
            closes = self._need_after_visit(m) <= r - 1
            if self.rolling:  # nothing missing nor open: the row may run into the next window
                free_length = (m == 0) & ~state.pinned[rows]
                fits, closes = fits | free_length, closes | free_length
            free = room & ((self.max_codes - k - 1) + later >= m) & fits
            fr, rq = rows[free], rows[room & ~free]
            if fr.size:
                allowed[fr, N_SPECIAL:] = ((code_ok[fr, N_SPECIAL:] | state.missing[fr, N_SPECIAL:])
                                           & ~state.used[fr, N_SPECIAL:])
            if rq.size:
                allowed[rq, N_SPECIAL:] = state.missing[rq, N_SPECIAL:] & ~state.used[rq, N_SPECIAL:]
            allowed[rows, END_VISIT_ID] = (k >= 1) & (later >= m) & closes
        allowed[phase == START, VISIT_ID] = True
        after = np.flatnonzero(phase == AFTER_VISIT)
        if after.size:
            m = nm[after]
            room = (m > 0) | (left[after] >= 4)
            if self.rolling:
                room = room | (m == 0)
            allowed[after, VISIT_ID] = (nv[after] < self.max_visits) & room
            allowed[after, EOS_ID] = m == 0
        allowed[phase == DONE, PAD_ID] = True
        return allowed

    def advance(self, state: GrammarState, tokens: np.ndarray) -> None:
        """Move every row by its emitted token (in place). Tokens must be allowed ones."""
        tokens = np.asarray(tokens, dtype=np.int64)
        phase = state.phase
        state.length[phase != DONE] += 1
        is_code = tokens >= N_SPECIAL
        code_rows = np.flatnonzero(is_code & (phase == IN_VISIT))
        if code_rows.size:
            codes = tokens[code_rows]
            state.used[code_rows, codes] = True
            state.n_codes[code_rows] += 1
            hit = state.missing[code_rows, codes]
            state.missing[code_rows, codes] = False
            state.n_missing[code_rows] -= hit.astype(np.int32)
            if self.code_rank is not None:
                rank = self.code_rank[N_SPECIAL:]
                passed = rank[None, :] <= self.code_rank[codes][:, None]
                state.used[code_rows, N_SPECIAL:] |= passed & ~state.missing[code_rows, N_SPECIAL:]
            if state.pinned is not None:
                state.pinned[code_rows[hit]] = True
        opens = np.flatnonzero((tokens == VISIT_ID) & ((phase == START) | (phase == AFTER_VISIT)))
        closes = np.flatnonzero((tokens == END_VISIT_ID) & (phase == IN_VISIT))
        ends = np.flatnonzero((tokens == EOS_ID) & (phase == AFTER_VISIT))
        state.n_visits[opens] += 1
        state.n_codes[opens] = 0
        state.phase[opens] = IN_VISIT
        if closes.size:
            state.used[closes] = False
            if state.pinned is not None:
                state.pinned[closes] = False
        state.phase[closes] = AFTER_VISIT
        state.phase[ends] = DONE
