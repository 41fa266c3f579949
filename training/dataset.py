"""Tokenisation of patients and batching for the BART objective.

A patient becomes ``<s> <v> c1 c2 .. </v> <v> ... </v> </s>`` (token ids of
:class:`app.vocab.Vocabulary`); codes are shuffled within each visit when a random generator is
given (a visit is a set). Codes outside the vocabulary are dropped, then empty visits. A patient
longer than ``max_len`` tokens is either split into windows of consecutive visits
(:func:`encode_windowed`, the rule of :mod:`app.windows`: every visit is kept) or, in
:func:`encode_patients` (DP runs, ``train.long_patients=truncate``), keeps its earliest visits
that fit (and still ends with ``</s>``).
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

from app.corpus import AGE_CAP, SEX_IDS, Patient
from app.vocab import (
    BOS,
    END_VISIT,
    EOS,
    MASK,
    PAD,
    SPECIAL_TOKENS,
    VISIT,
    Vocabulary,
)
from app.windows import CONTEXT_VISITS, continuation_prompt, fit_context, window_bounds
from training.config import ObjectiveConfig

__all__ = [
    "TOKENS",
    "Batch",
    "EncodedExamples",
    "EncodedPatient",
    "WindowedEncoding",
    "collate",
    "corrupt",
    "encode_patients",
    "encode_windowed",
    "length_batches",
    "patient_tokens",
]


@dataclass(frozen=True)
class _Ids:
    pad: int
    bos: int
    eos: int
    visit: int
    end_visit: int
    mask: int
    n_special: int


TOKENS = _Ids(*(SPECIAL_TOKENS.index(t) for t in (PAD, BOS, EOS, VISIT, END_VISIT, MASK)),
              n_special=len(SPECIAL_TOKENS))


@dataclass(frozen=True)
class EncodedPatient:
    """One training example: a whole patient, or one window of a long one (:mod:`app.windows`).

    The defaults describe a whole patient, encoded as it always was; a window sets the rest.
    """

    age: float  # years: at the first visit, or at a window's first visit
    sex: int
    visits: tuple[np.ndarray, ...]  # token ids of each visit's codes
    # a continuation window: the visits its encoder prompt shows (None: not a continuation)
    context: tuple[np.ndarray, ...] | None = None
    kept: int = -1  # visits the window keeps (the encoder's views show only those); -1: all
    cut: int = 0  # a window without the real end: its target is the first ``cut`` tokens

    @property
    def n_tokens(self) -> int:
        return self.cut or 2 + sum(len(v) + 2 for v in self.visits)


class EncodedExamples(Sequence[EncodedPatient]):
    """Encoded examples, stored compactly: the codes of every stored visit in one flat int64
    array with the visits' offsets, and one array per field of the examples.

    Indexing gives an :class:`EncodedPatient` whose visits (and context) are read-only views of
    the flat array: what a list of them held, without a numpy array per visit. That list was
    85 MB for the three splits of the claims-scale corpus (514k visit arrays of ~4 codes, ~130
    bytes each), resident through training; this is 14 MB. Built by :meth:`append`; the first
    read freezes it.
    """

    def __init__(self) -> None:
        self._codes = array("q")  # the codes of every stored visit, one visit after another
        self._ends = array("q")  # per stored visit: where its codes end in _codes
        self._age, self._sex = array("d"), array("b")
        # per example: its first stored visit and how many; its context's (n -1: no context)
        self._first, self._count = array("q"), array("i")
        self._context_first, self._context_count = array("q"), array("i")
        self._kept, self._cut = array("i"), array("i")
        self._frozen: dict[str, np.ndarray] | None = None

    def _store(self, visits: Iterable[np.ndarray]) -> tuple[int, int]:
        first = len(self._ends)
        for visit in visits:
            self._codes.frombytes(np.ascontiguousarray(visit, dtype=np.int64).tobytes())
            self._ends.append(len(self._codes))
        return first, len(self._ends) - first

    def append(self, age: float, sex: int, visits: Iterable[np.ndarray],
               context: Iterable[np.ndarray] | None = None, kept: int = -1,
               cut: int = 0) -> None:
        """Add an example (the fields of :class:`EncodedPatient`)."""
        if self._frozen is not None:
            raise ValueError("EncodedExamples: no appending after the first read")
        first, count = self._store(visits)
        context_first, context_count = self._store(context) if context is not None else (0, -1)
        self._age.append(float(age))
        self._sex.append(int(sex))
        self._first.append(first)
        self._count.append(count)
        self._context_first.append(context_first)
        self._context_count.append(context_count)
        self._kept.append(int(kept))
        self._cut.append(int(cut))

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._frozen is None:
            frozen = {}
            for name in ("codes", "ends", "age", "sex", "first", "count", "context_first",
                         "context_count", "kept", "cut"):
                values = np.array(getattr(self, "_" + name))  # a copy: the array may go
                values.flags.writeable = False
                frozen[name] = values
                setattr(self, "_" + name, None)
            starts = np.zeros(frozen["ends"].size + 1, dtype=np.int64)
            starts[1:] = frozen.pop("ends")
            starts.flags.writeable = False
            frozen["starts"] = starts  # visit k's codes: codes[starts[k]:starts[k + 1]]
            self._frozen = frozen
        return self._frozen

    def _visits(self, first: int, count: int) -> tuple[np.ndarray, ...]:
        a = self._arrays()
        bounds = a["starts"][first:first + count + 1].tolist()
        codes = a["codes"]
        return tuple(codes[bounds[k]:bounds[k + 1]] for k in range(count))

    def __len__(self) -> int:
        return len(self._age) if self._frozen is None else self._frozen["age"].size

    @overload
    def __getitem__(self, index: int) -> EncodedPatient: ...

    @overload
    def __getitem__(self, index: slice) -> list[EncodedPatient]: ...

    def __getitem__(self, index: int | slice) -> EncodedPatient | list[EncodedPatient]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {index} of {n}")
        a = self._arrays()
        context_count = int(a["context_count"][i])
        context = None if context_count < 0 else \
            self._visits(int(a["context_first"][i]), context_count)
        return EncodedPatient(float(a["age"][i]), int(a["sex"][i]),
                              self._visits(int(a["first"][i]), int(a["count"][i])), context,
                              kept=int(a["kept"][i]), cut=int(a["cut"][i]))

    def __iter__(self) -> Iterator[EncodedPatient]:
        return (self[i] for i in range(len(self)))

    @property
    def n_tokens(self) -> np.ndarray:
        """``EncodedPatient.n_tokens`` of every example, without building them."""
        a = self._arrays()
        sizes = np.diff(a["starts"]) + 2  # <v> codes </v>
        total = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=total[1:])
        tokens = 2 + total[a["first"] + a["count"]] - total[a["first"]]
        return np.where(a["cut"] > 0, a["cut"], tokens)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(v.nbytes for v in self._arrays().values())


def _visit_ids(patient: Patient, vocab: Vocabulary,
               rank: np.ndarray | None) -> tuple[list[np.ndarray], list[int]]:
    """The non-empty visits as token ids (in ``rank`` order) and their indices in the patient."""
    visits, where = [], []
    for i, visit in enumerate(patient.visits):
        ids = np.array([vocab.index[c] for c in visit if c in vocab.index], dtype=np.int64)
        if ids.size == 0:
            continue
        if rank is not None:
            ids = ids[np.argsort(rank[ids], kind="stable")]
        visits.append(ids)
        where.append(i)
    return visits, where


def encode_patients(patients: Iterable[Patient], vocab: Vocabulary,
                    max_len: int, rank: np.ndarray | None = None) -> EncodedExamples:
    """Token-id visits of each patient, the earliest that fit ``max_len`` tokens (the
    truncation rule; :func:`encode_windowed` keeps every visit).

    With ``rank`` (:func:`app.vocab.code_rank`) the codes of each visit are stored in that order.
    """
    out = EncodedExamples()
    for p in patients:
        visits, length = [], 2
        for ids in _visit_ids(p, vocab, rank)[0]:
            if length + ids.size + 2 > max_len:
                break
            visits.append(ids)
            length += ids.size + 2
        out.append(float(p.age), SEX_IDS[p.sex], visits)
    return out


@dataclass
class WindowedEncoding:
    """The examples of :func:`encode_windowed` and what the window rule did."""

    examples: EncodedExamples
    counts: dict[str, int] = field(default_factory=dict)
    # continuation windows of patients with visit times: summed (age at the window - age at
    # the first visit) in years, and summed visits before those windows
    shift_years: float = 0.0
    shift_visits: int = 0

    @property
    def years_per_visit(self) -> float:
        """Mean years a patient ages per visit, over the continuation windows with times."""
        return self.shift_years / self.shift_visits if self.shift_visits else 0.0

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "years_per_visit": self.years_per_visit}


def _window_age(patient: Patient, first_visit: int) -> float:
    """Age at a visit: the first visit's age plus the elapsed time where the source has it."""
    if patient.visit_times is None or first_visit == 0:
        return float(patient.age)
    days = patient.visit_times[first_visit][0]
    return float(min(AGE_CAP, patient.age + days / 365.25))


def encode_windowed(patients: Iterable[Patient], vocab: Vocabulary, max_len: int,
                    rank: np.ndarray | None = None, context_visits: int = CONTEXT_VISITS,
                    context_tokens: int = 0) -> WindowedEncoding:
    """Every patient as examples of at most ``max_len`` tokens, keeping every visit.

    A patient that fits is one example, exactly as :func:`encode_patients` encodes it; a longer
    one becomes the windows of :func:`app.windows.window_bounds` (continuation windows carry
    their encoder context and the age at their first visit; see :mod:`app.windows`).
    ``context_tokens`` 0: ``max_len // 2`` (as :class:`app.windows.WindowRule`).
    """
    context_tokens = context_tokens or max(8, max_len // 2)
    out = WindowedEncoding(EncodedExamples())
    n = {"patients_total": 0, "patients_windowed": 0, "windows": 0, "continuation_windows": 0,
         "visits_total": 0, "visits_kept": 0, "codes_cut": 0}
    for p in patients:
        visits, where = _visit_ids(p, vocab, rank)
        n["patients_total"] += 1
        n["visits_total"] += len(visits)
        age, sex = float(p.age), SEX_IDS[p.sex]
        if 2 + sum(v.size + 2 for v in visits) <= max_len:
            out.examples.append(age, sex, visits)
            n["windows"] += 1
            n["visits_kept"] += len(visits)
            continue
        n["patients_windowed"] += 1
        n["codes_cut"] += sum(max(0, v.size - (max_len - 4)) for v in visits)
        visits = [v[: max_len - 4] for v in visits]
        for w in window_bounds([v.size for v in visits], max_len):
            context = None
            if w.start > 0:
                context = tuple(np.asarray(v, dtype=np.int64) for v in fit_context(
                    visits[: w.start], context_visits, context_tokens))
                age_w = _window_age(p, where[w.start])
                if p.visit_times is not None:
                    out.shift_years += age_w - age
                    out.shift_visits += w.start
                n["continuation_windows"] += 1
            out.examples.append(age if context is None else age_w, sex,
                                visits[w.start:w.stop], context, kept=w.kept - w.start,
                                cut=0 if w.final else max_len)
            n["windows"] += 1
            n["visits_kept"] += w.kept - w.start
    out.counts = n
    return out


def patient_tokens(visits: Sequence[Sequence[int]]) -> list[int]:
    """``<s> (<v> codes </v>)* </s>`` of already ordered visits."""
    out = [TOKENS.bos]
    for visit in visits:
        out.append(TOKENS.visit)
        out.extend(int(c) for c in visit)
        out.append(TOKENS.end_visit)
    out.append(TOKENS.eos)
    return out


def corrupt(visits: list[np.ndarray], rng: np.random.Generator,
            cfg: ObjectiveConfig) -> list[int]:
    """The encoder's view of a patient (PromptEHR-style noising, see :mod:`training.objective`).

    With ``demographics_only_prob`` nothing but ``<s> </s>``; otherwise later visits are cut
    with ``truncate_prob`` (keep the first k of n, k uniform in 1..n-1), each code is dropped
    with ``drop_prob``, and spans of the remaining codes of a visit (lengths ``1 +
    Poisson(span_poisson - 1)``) become one ``<mask>`` each, covering about ``mask_prob`` of
    the codes.
    """
    if rng.random() < cfg.demographics_only_prob or not visits:
        return [TOKENS.bos, TOKENS.eos]
    if len(visits) > 1 and rng.random() < cfg.truncate_prob:
        visits = visits[: int(rng.integers(1, len(visits)))]
    span_mean = max(cfg.span_poisson, 1.0)
    start_prob = cfg.mask_prob / span_mean
    out = [TOKENS.bos]
    for visit in visits:
        out.append(TOKENS.visit)
        if cfg.drop_prob > 0:
            visit = visit[rng.random(len(visit)) >= cfg.drop_prob]
        i = 0
        while i < len(visit):
            if start_prob > 0 and rng.random() < start_prob:
                out.append(TOKENS.mask)
                i += 1 + int(rng.poisson(span_mean - 1.0))
            else:
                out.append(int(visit[i]))
                i += 1
        out.append(TOKENS.end_visit)
    out.append(TOKENS.eos)
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S] encoder view
    attention_mask: torch.Tensor  # [B, S]
    decoder_input_ids: torch.Tensor  # [B, T] = target[:-1]
    labels: torch.Tensor  # [B, T] = target[1:], <pad> where absent
    age: torch.Tensor  # [B] float years
    sex: torch.Tensor  # [B] int64, 0 F / 1 M

    def __len__(self) -> int:
        return int(self.age.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device`` (itself when it is already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                              self.decoder_input_ids, self.labels, self.age,
                                              self.sex)))


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), TOKENS.pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def collate(patients: Sequence[EncodedPatient], rng: np.random.Generator, cfg: ObjectiveConfig,
            mode: str = "train", shuffle: bool = True) -> Batch:
    """One batch. ``mode``: ``train`` (corrupted encoder view), ``demographics`` (encoder sees
    only ``<s> </s>``) or ``full`` (encoder sees the whole patient). Codes are shuffled within
    visits by ``rng`` unless ``shuffle=False`` (stored order)."""
    targets, sources = [], []
    shuffle = shuffle and cfg.code_order == "shuffle"
    if mode not in ("train", "demographics", "full"):
        raise ValueError(f"unknown batch mode {mode!r}")
    for p in patients:
        visits = [rng.permutation(v) for v in p.visits] if shuffle else list(p.visits)
        target = patient_tokens(visits)
        if p.cut:  # a window without the real end: its first ``cut`` tokens, no </s>
            target = target[:-1][: p.cut]
        targets.append(target)
        if p.context is not None:  # a continuation window: the prompt generation feeds
            context = [rng.permutation(v) for v in p.context] if shuffle else list(p.context)
            sources.append(continuation_prompt(context))
            continue
        if p.kept >= 0:
            visits = visits[: p.kept]
        if mode == "train":
            sources.append(corrupt(visits, rng, cfg))
        elif mode == "demographics":
            sources.append([TOKENS.bos, TOKENS.eos])
        else:
            sources.append(patient_tokens(visits))
    src = _pad(sources)
    tgt = _pad(targets)
    return Batch(input_ids=src, attention_mask=(src != TOKENS.pad).long(),
                 decoder_input_ids=tgt[:, :-1].clone(), labels=tgt[:, 1:].clone(),
                 age=torch.tensor([p.age for p in patients], dtype=torch.float32),
                 sex=torch.tensor([p.sex for p in patients], dtype=torch.long))


def length_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator | None,
                   bucket: int = 50, max_tokens: int = 0) -> Iterator[np.ndarray]:
    """Index batches; with ``rng``, shuffled then length-sorted within buckets of batches.

    A batch holds at most ``batch_size`` patients and, when ``max_tokens`` > 0, at most
    ``max_tokens`` padded tokens (patients x its longest patient), so memory is bounded by the
    token budget whatever the longest patient (a patient longer than the budget is a batch of
    its own).
    """
    n = len(lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    lengths = np.asarray(lengths)
    chunk = batch_size * bucket
    batches = []
    for s in range(0, n, chunk):
        part = order[s: s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        if max_tokens <= 0:
            batches.extend(part[i: i + batch_size] for i in range(0, len(part), batch_size))
            continue
        start = 0
        for i in range(1, len(part) + 1):
            full = i - start >= batch_size
            over = i < len(part) and (i + 1 - start) * lengths[part[i]] > max_tokens
            if i == len(part) or full or over:
                batches.append(part[start:i])
                start = i
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    yield from batches
