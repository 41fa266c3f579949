"""Long patients: the window rule that training and generation share.

A patient's decoder stream is ``<s> (<v> codes </v>)* </s>``. When it is longer than the model's
``max_positions`` (``L`` below), the patient is trained on as **windows of consecutive visits**
and generated the same way, visit by visit, so no visit is ever cut away:

* **A window** is the first ``L`` tokens of the stream that starts at its first visit
  (``<s> <v> ...``). The window whose stream fits holds the real ``</s>`` (the *final* window);
  every earlier one is cut at ``L`` tokens, mid-visit or on a boundary, and has no ``</s>``.
* **A window keeps** the visits whose ``</v>`` is followed by a token inside it (position at
  most ``L - 2``): for those the model decided what comes next. The next window starts at the
  first visit not kept, so every visit is kept by exactly one window (and the visit cut at the
  end of a window is seen again, whole, at the start of the next).
* A visit of more than ``L - 4`` codes keeps its first ``L - 4`` (``<s> <v> codes </v> x``
  must fit one window); with the recipe's ``L`` (the 99.9th percentile of patient lengths, at
  least 32) this practically never happens and is counted where it does.
* **The continuation prompt** (the encoder input of every window but the first) is
  ``<s> <mask> (<v> codes </v>)* </s>``: ``<mask>`` straight after ``<s>``, where no other
  prompt has one (a prompt's ``<mask>`` otherwise stands inside a visit), marks that earlier
  history is hidden; the visits after it are the last ``context_visits`` visits before the
  window (older ones dropped first, then the oldest one's last codes, to fit
  ``context_tokens``). Its demographics are the sex and the **age at the window's first visit**:
  in training from the visit times where the source has them (the patient's age otherwise);
  in generation the patient's age plus ``years_per_visit`` per visit so far, the training
  split's mean (0 for sources without visit times).

Generation (:class:`app.decoding.engine.Engine`) decodes a window; a patient that fills it
without ``</s>`` keeps the visits the window kept and continues in a new window with the
continuation prompt, until ``</s>`` or the corpus's visit limit. A bundle records the rule in
its manifest (``long_patients``); a bundle without it (or trained on no long patient) decodes
exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from app.vocab import BOS, END_VISIT, EOS, MASK, SPECIAL_TOKENS, VISIT

__all__ = [
    "CONTEXT_VISITS",
    "MANIFEST_KEY",
    "MAX_POSITIONS_CAP",
    "RULE_TRUNCATE",
    "RULE_WINDOWS",
    "Window",
    "WindowRule",
    "continuation_prompt",
    "fit_context",
    "positions_for",
    "window_bounds",
]

MANIFEST_KEY = "long_patients"
RULE_WINDOWS = "windows"
RULE_TRUNCATE = "truncate"  # the earlier rule: keep the earliest visits that fit (DP runs)
CONTEXT_VISITS = 3
MAX_POSITIONS_CAP = 512  # longer patients are windowed, so a larger L buys no visit
_BOS, _EOS, _VISIT, _END_VISIT, _MASK = (SPECIAL_TOKENS.index(t)
                                         for t in (BOS, EOS, VISIT, END_VISIT, MASK))


def positions_for(length_p999: float) -> int:
    """The recipe's ``model.max_positions``: the 99.9th percentile of patient lengths in
    tokens, rounded up to a multiple of 32, between 32 and :data:`MAX_POSITIONS_CAP`."""
    return int(min(MAX_POSITIONS_CAP, max(32, 32 * math.ceil(length_p999 / 32))))


@dataclass(frozen=True)
class Window:
    """Visits ``[start, stop)`` carry tokens of the window; ``[start, kept)`` are kept."""

    start: int
    kept: int
    stop: int

    @property
    def final(self) -> bool:
        """The window holds the real ``</s>`` (it keeps every visit it carries)."""
        return self.kept == self.stop


def window_bounds(visit_sizes: Sequence[int], max_positions: int) -> list[Window]:
    """The windows of a patient whose visits hold ``visit_sizes`` codes (each at most
    ``max_positions - 4``); one final window when the patient fits."""
    if max_positions < 5:
        raise ValueError("max_positions must be at least 5 (<s> <v> code </v> </s>)")
    if any(c > max_positions - 4 for c in visit_sizes):
        raise ValueError(f"a visit of more than {max_positions - 4} codes cannot fit a window")
    n, out, start = len(visit_sizes), [], 0
    while True:
        pos, kept, stop = 1, start, start  # pos: where the next <v> would go
        for i in range(start, n):
            if pos >= max_positions:
                break
            stop = i + 1
            close = pos + visit_sizes[i] + 1  # position of this visit's </v>
            if close <= max_positions - 2:
                kept = i + 1
            pos = close + 1
        out.append(Window(start, kept, stop))
        if kept >= n:
            return out
        start = kept


def fit_context(visits: Sequence[Sequence[int]], context_visits: int,
                context_tokens: int) -> list[list[int]]:
    """The visits a continuation prompt shows: the last ``context_visits`` of ``visits``
    (code token ids), older ones dropped first, then the oldest one's last codes, so that
    :func:`continuation_prompt` is at most ``context_tokens`` long."""
    shown = [list(v) for v in visits[len(visits) - context_visits:]] if context_visits > 0 else []
    budget = context_tokens - 3  # <s> <mask> ... </s>
    while shown and sum(len(v) + 2 for v in shown) > budget:
        if len(shown) > 1:
            shown.pop(0)
        else:
            shown[0] = shown[0][: max(0, budget - 2)]
            if not shown[0]:
                shown.pop(0)
    return shown


def continuation_prompt(context: Sequence[Sequence[int]]) -> list[int]:
    """``<s> <mask> (<v> codes </v>)* </s>``: the encoder prompt of a continuation window."""
    out = [_BOS, _MASK]
    for visit in context:
        out.append(_VISIT)
        out.extend(int(c) for c in visit)
        out.append(_END_VISIT)
    out.append(_EOS)
    return out


@dataclass(frozen=True)
class WindowRule:
    """What the engine needs of a windowed bundle (the manifest's ``long_patients``)."""

    max_positions: int
    context_visits: int = CONTEXT_VISITS
    context_tokens: int = 0  # 0: max_positions // 2
    years_per_visit: float = 0.0

    def __post_init__(self) -> None:
        if self.context_tokens <= 0:
            object.__setattr__(self, "context_tokens", max(8, self.max_positions // 2))

    def prompt(self, visits: Sequence[Sequence[int]]) -> list[int]:
        """The continuation prompt after ``visits`` (code token ids, oldest first)."""
        return continuation_prompt(fit_context(visits, self.context_visits,
                                               self.context_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {"rule": RULE_WINDOWS, **asdict(self)}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> WindowRule | None:
        """The rule of a bundle trained on windows (None: a bundle without windowing, or one
        whose training split had no long patient, so its model never saw a continuation)."""
        info = manifest.get(MANIFEST_KEY) or {}
        if info.get("rule") != RULE_WINDOWS or not (info.get("train") or {}).get(
                "continuation_windows"):
            return None
        return cls(int(info["max_positions"]), int(info.get("context_visits", CONTEXT_VISITS)),
                   int(info.get("context_tokens", 0)), float(info.get("years_per_visit", 0.0)))
