"""The generation engine: batched decoding of synthetic patients with four strategies.

:class:`Engine` drives any :class:`~app.decoding.model_api.StepModel` (ONNX Runtime in
production) with a numpy loop: per step the model's log-probabilities, the strategy's bias, the
grammar mask (:mod:`app.decoding.grammar`) and the MCE validity mask
(:mod:`app.decoding.validity`) give the tokens each row may emit, and one counter-based uniform
per row picks one (:mod:`app.decoding.sampling`). Structure and validity therefore hold for any
model, trained or not.

Request semantics:

* ``demographics``: one ``(age, sex)`` per patient (tuples, dicts, :class:`Demographics` or
  :class:`~app.corpus.Patient`); each patient is decoded under its own age and sex.
* ``strategy`` and ``params``: see :mod:`app.decoding.params` (documented defaults).
* ``must_include``: codes every patient (a flat list) or each patient (a list of lists) must
  have; any accepted spelling (``250.00``). They are placed by the grammar (``</s>`` is refused
  while one is missing and the last free slots are reserved for them); everything else is
  sampled around them. Unknown codes raise :class:`UnknownCodeError`; a code the validity mask
  forbids for a patient (a pregnancy code for a man) raises :class:`ImpossibleConstraintError`
  before any decoding.
* ``validity_mask`` (default on): forbid codes inconsistent with the patient's age and sex under
  the CMS MCE v32 edits; off measures the model alone.
* ``exclude``: codes never generated (masked out of every row, like the validity mask); a code
  both required and excluded, or an exclusion that leaves a patient no code, raises
  :class:`ImpossibleConstraintError`.
* ``seed``: randomness is a function of (seed, patient index, stream, step) only, so the same
  engine, request and seed give byte-identical output (:meth:`GenerationResult.to_json`)
  whatever the batch size, for any model whose rows do not interact (ONNX Runtime kernels may
  round differently at a different batch size; the engine's batch size is fixed by its config).
* ``row_seeds`` / ``row_indices`` (optional, one per patient): row ``r`` is decoded as patient
  ``row_indices[r]`` of a request with seed ``row_seeds[r]``, so rows of several requests can
  share one batch (the service's micro-batcher) and each row gets exactly the output it would
  get in its own request. Defaults: ``seed`` for every row, indices ``0..n-1`` (the plain call).

Long patients (a bundle trained on windows, :mod:`app.windows`): a patient that fills the
model's window without ``</s>`` keeps the visits the window kept and is decoded on in a new
window (the continuation prompt of its last visits, the age at that window's first visit, a
random stream of its own) until ``</s>`` or ``max_visits``; the patient is the concatenation.
Without a window rule (older bundles, or a training split without long patients) the engine
decodes exactly as before.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.corpus import AGE_CAP, SEX_IDS, Patient
from app.decoding.calibration import CALIBRATION_FILE, StopCalibration
from app.decoding.errors import (
    ImpossibleConstraintError,
    InvalidParametersError,
    PrivacyGuardError,
    StrategyUnavailableError,
    UnknownCodeError,
)
from app.decoding.grammar import (
    AFTER_VISIT,
    DONE,
    END_VISIT_ID,
    EOS_ID,
    IN_VISIT,
    N_SPECIAL,
    VISIT_ID,
    Grammar,
)
from app.decoding.model_api import StepModel
from app.decoding.params import (
    CooccurrenceParams,
    PlainParams,
    RerankParams,
    RetrieveEditParams,
    parse_params,
)
from app.decoding.prompt import empty_prompt, pad_prompts, prompt_ids
from app.decoding.retrieval import RetrievalIndex
from app.decoding.sampling import row_keys, sample_tokens, uniforms
from app.decoding.strategies import CooccurrenceBias, CooccurrenceStats
from app.decoding.two_stage import LengthPlan
from app.decoding.validity import ValidityMask
from app.icd9.codes import InvalidCodeError, normalize_code
from app.icd9.edits import CodeEdits
from app.vocab import BOS, PAD, Vocabulary, code_rank
from app.windows import WindowRule

__all__ = ["MAX_AGE", "Demographics", "Engine", "GenerationResult"]

MAX_AGE = 124.0  # the MCE's upper age bound


@dataclass(frozen=True)
class Demographics:
    age: float
    sex: str  # "F" or "M"


@dataclass
class GenerationResult:
    """Patients in request order, their token ids and model log-likelihoods."""

    patients: list[Patient]
    token_ids: list[list[int]]
    log_likelihood: list[float]
    strategy: str
    params: dict[str, Any]
    seed: int
    attempts: list[int] | None = None  # retrieve_edit: tries per patient
    stats: dict[str, float] = field(default_factory=dict)  # timings; not part of the output

    def to_json(self) -> str:
        """Canonical JSON of everything but timings (byte-identical for the same request)."""
        payload = {"strategy": self.strategy, "params": self.params, "seed": self.seed,
                   "patients": [p.to_dict() for p in self.patients],
                   "token_ids": self.token_ids,
                   "log_likelihood": [float(np.float32(x)).hex() for x in self.log_likelihood],
                   "attempts": self.attempts}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))


@dataclass
class _Chunk:
    """Decoded rows: token ids per row, log-likelihood and emitted-token counts."""

    tokens: np.ndarray  # int64 [R, L]
    loglik: np.ndarray  # float64 [R]
    n_tokens: np.ndarray  # int64 [R]
    # rolling windows only: per row, the tokens, log-likelihood and emitted-token count up to
    # the last visit the window keeps (app.windows), for rows that filled it without </s>
    kept: np.ndarray | None = None
    kept_loglik: np.ndarray | None = None
    kept_n_tokens: np.ndarray | None = None


class Engine:
    """Batched synthetic-patient decoding over a step model and a bundle's statistics.

    ``max_visits``, ``max_codes_per_visit`` and ``max_length`` are the defaults and hard caps
    (``max_length``: decoder positions, ``<s>`` and ``</s>`` included; with ``windows``, the
    length of one window: a patient rolls over windows up to ``max_visits``); ``batch_size``
    rows are decoded together.
    """

    def __init__(self, model: StepModel, vocab: Vocabulary, *,
                 cooccurrence: CooccurrenceStats | None = None,
                 retrieval: RetrievalIndex | None = None, max_visits: int = 20,
                 max_codes_per_visit: int = 40, max_length: int = 256, batch_size: int = 64,
                 edits: CodeEdits | None = None, max_prompt_length: int | None = None,
                 calibration: StopCalibration | None = None,
                 unavailable: dict[str, str] | None = None,
                 windows: WindowRule | None = None,
                 length_plan: LengthPlan | None = None,
                 code_order: str = "shuffle") -> None:
        if getattr(model, "vocab_size", len(vocab)) != len(vocab):
            raise ValueError(f"model has {model.vocab_size} tokens, vocabulary {len(vocab)}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.vocab = vocab
        self.cooccurrence = cooccurrence
        self.retrieval = retrieval
        # strategy -> why this bundle cannot serve it (a DP bundle: no co-occurrence, no index)
        self.unavailable: dict[str, str] = dict(unavailable or {})
        self.max_visits = max_visits
        self.max_codes_per_visit = max_codes_per_visit
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length or max_length
        # the long-patient window rule of a bundle trained on windows (None: one window)
        self.windows = windows
        if windows is not None and windows.max_positions != max_length:
            raise ValueError(f"the window rule is for {windows.max_positions} positions, the "
                             f"engine decodes {max_length}")
        self.validity = ValidityMask(vocab, edits)
        # The bundle's stop calibration (app.decoding.calibration); None or empty: the model's
        # own stop probabilities.
        self.calibration = calibration if calibration is not None and not calibration.empty \
            else None
        # training histograms for two_stage requests (app.decoding.two_stage); None: refused
        self.length_plan = length_plan
        # the in-visit code order the model was trained on: a fixed one is decoded under it
        self.code_rank = code_rank(vocab, code_order)
        self.model_seconds = 0.0

    @classmethod
    def from_bundle(cls, bundle: Any, intra_op_threads: int = 1, batch_size: int = 64,
                    quantize: bool = False, **overrides: Any) -> Engine:
        """The engine over a bundle's ONNX graphs (:class:`app.bundle.Bundle` or its folder).

        Limits come from the bundle: ``max_length`` from the model's positions, the visit and
        code caps from the training split's largest patient and visit; the retrieval index is
        built from ``train_index.json.gz`` where the bundle has one. ``quantize``: run the
        int8 decoders (the bundle's ``*.int8.onnx``, or quantized on load where it has none).
        """
        from app.bundle import load_bundle
        from app.decoding.onnx_model import GRAPHS, INT8_GRAPHS, OnnxStepModel

        if not hasattr(bundle, "vocab"):
            bundle = load_bundle(bundle)
        for name in GRAPHS:
            bundle.file(name)  # BundleError naming the missing graph
        if quantize:
            for name in INT8_GRAPHS.values():
                if bundle.has_file(name):
                    bundle.file(name)  # checksum verified where the bundle registers it
        vocab = bundle.vocab
        stats = bundle.reference_stats or {}
        cooc = None if bundle.cooccurrence is None else \
            CooccurrenceStats.from_vocab(bundle.cooccurrence, vocab, stats.get("n_visits"))
        dp = (bundle.manifest.get("privacy") or {}).get("differential_privacy") or {}
        retrieval = None
        if any(bundle.has_file(n) for n in ("train_index.json.gz", "train_index.json")):
            retrieval = RetrievalIndex.from_records(bundle.load_train_index(), vocab)
        calibration = None
        if bundle.has_file(CALIBRATION_FILE):
            calibration = StopCalibration.load(bundle.file(CALIBRATION_FILE))
        positions = int(bundle.model_config.get("max_positions", 256))
        max_visits, max_codes = length_limits(stats)
        options: dict[str, Any] = {
            "max_length": positions, "max_prompt_length": positions,
            "max_visits": max_visits, "max_codes_per_visit": max_codes,
            "batch_size": batch_size, "calibration": calibration,
            "unavailable": dict(dp.get("unavailable_strategies") or {}),
            "windows": WindowRule.from_manifest(bundle.manifest),
            "length_plan": LengthPlan.from_stats(stats),
            "code_order": ((bundle.manifest.get("run_config") or {}).get("objective") or {})
            .get("code_order", "shuffle")}
        options.update(overrides)
        model = OnnxStepModel(bundle.path, intra_op_threads=intra_op_threads, quantize=quantize)
        return cls(model, vocab, cooccurrence=cooc, retrieval=retrieval, **options)

    # -- request checking ---------------------------------------------------------------------
    @staticmethod
    def _demographics(items: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        ages, sexes = [], []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                age, sex = item.get("age"), item.get("sex")
            elif isinstance(item, (Demographics, Patient)):
                age, sex = item.age, item.sex
            else:
                try:
                    age, sex = item
                except (TypeError, ValueError):
                    raise InvalidParametersError(
                        f"demographics[{i}]: expected (age, sex), got {item!r}") from None
            try:
                age = float(age)
            except (TypeError, ValueError):
                raise InvalidParametersError(
                    f"demographics[{i}].age: not a number: {age!r}") from None
            if not (math.isfinite(age) and 0.0 <= age <= MAX_AGE):
                raise InvalidParametersError(
                    f"demographics[{i}].age: must lie in 0-{MAX_AGE:g} years, got {age!r}")
            if sex not in SEX_IDS:
                raise InvalidParametersError(f"demographics[{i}].sex: must be 'F' or 'M', "
                                             f"got {sex!r}")
            ages.append(age)
            sexes.append(str(sex))
        return np.asarray(ages, dtype=np.float64), np.asarray(
            [SEX_IDS[s] for s in sexes], dtype=np.int64), sexes

    def _code_token(self, raw: Any) -> int:
        try:
            code = normalize_code(raw)
        except InvalidCodeError as err:
            raise UnknownCodeError(f"must_include: {err}") from None
        if code not in self.vocab.index or self.vocab.index[code] < N_SPECIAL:
            raise UnknownCodeError(
                f"must_include: code {code} is not in this bundle's vocabulary "
                f"({self.vocab.n_codes} codes seen in training)")
        return self.vocab.index[code]

    def _required(self, must_include: Any, ages: np.ndarray, sexes: list[str],
                  validity_mask: bool, grammar: Grammar) -> list[list[int]]:
        n = len(sexes)
        if must_include is None:
            per_patient: list[Sequence[Any]] = [[] for _ in range(n)]
        elif isinstance(must_include, str):
            per_patient = [[must_include]] * n
        else:
            items = list(must_include)
            if all(isinstance(x, str) for x in items):
                per_patient = [items] * n
            else:
                if len(items) != n or not all(isinstance(x, (list, tuple)) for x in items):
                    raise InvalidParametersError(
                        "must_include: give a list of codes for every patient, or one list of "
                        f"codes per patient ({n} lists)")
                per_patient = items
        cache: dict[Any, int] = {}
        required: list[list[int]] = []
        for i, codes in enumerate(per_patient):
            ids: list[int] = []
            for raw in codes:
                if raw not in cache:
                    cache[raw] = self._code_token(raw)
                if cache[raw] not in ids:
                    ids.append(cache[raw])
            if validity_mask:
                for token in ids:
                    code = self.vocab.tokens[token]
                    reason = self.validity.violation(code, ages[i], sexes[i])
                    if reason is not None:
                        raise ImpossibleConstraintError(
                            f"must_include: code {code} is impossible for patient {i} "
                            f"(age {ages[i]:g}, sex {sexes[i]}) with the validity mask on: "
                            f"{reason}; switch validity_mask off to allow it")
            if not grammar.check_feasible(np.asarray([len(ids)]))[0]:
                raise ImpossibleConstraintError(
                    f"must_include: {len(ids)} codes for patient {i} do not fit "
                    f"{grammar.max_visits} visits x {grammar.max_codes} codes within "
                    f"{grammar.max_length} tokens")
            required.append(ids)
        return required

    def _with_default_temperature(self, strategy: str, params: PlainParams) -> PlainParams:
        """``params`` with the bundle's fitted temperature where the request set none (the
        strategies the stop calibration applies to; ``retrieve_edit`` decodes uncalibrated)."""
        fitted = self.calibration.temperature if self.calibration is not None else 1.0
        if (fitted == 1.0 or strategy == "retrieve_edit"
                or "temperature" in params.model_fields_set):
            return params
        return params.model_copy(update={"temperature": fitted})

    def _grammar(self, params: PlainParams) -> Grammar:
        max_codes = params.max_codes_per_visit or self.max_codes_per_visit
        if self.windows is None:
            return Grammar(len(self.vocab), params.max_visits or self.max_visits, max_codes,
                           self.max_length, code_rank=self.code_rank)
        # a visit must fit one window (<s> <v> codes </v> x), as in training (app.windows)
        return Grammar(len(self.vocab), params.max_visits or self.max_visits,
                       max(1, min(max_codes, self.max_length - 4)), self.max_length,
                       rolling=True, code_rank=self.code_rank)

    # -- the public call ----------------------------------------------------------------------
    def generate(self, demographics: Sequence[Any], strategy: str = "plain",
                 params: PlainParams | dict[str, Any] | None = None, seed: int = 0,
                 must_include: Any = None, validity_mask: bool = True,
                 batch_size: int | None = None, id_prefix: str = "synthetic",
                 row_seeds: Sequence[int] | None = None,
                 row_indices: Sequence[int] | None = None,
                 exclude: Sequence[str] | None = None) -> GenerationResult:
        """Generate one patient per entry of ``demographics`` (see the module docstring)."""
        started = time.perf_counter()
        self.model_seconds = 0.0
        parsed = self._with_default_temperature(strategy, parse_params(strategy, params))
        if strategy in self.unavailable:
            raise StrategyUnavailableError(
                f"strategy {strategy!r} is not available: {self.unavailable[strategy]}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise InvalidParametersError(f"seed: must be a non-negative integer, got {seed!r}")
        seed = int(seed)
        if batch_size is not None and batch_size < 1:
            raise InvalidParametersError("batch_size: must be at least 1")
        batch = batch_size or self.batch_size
        if getattr(parsed, "two_stage", False) and self.length_plan is None:
            raise InvalidParametersError(
                "two_stage: this bundle has no visit and code histograms to plan lengths from")
        ages, sex_ids, sexes = self._demographics(demographics)
        grammar = self._grammar(parsed)
        required = self._required(must_include, ages, sexes, validity_mask, grammar)
        if validity_mask:
            self._check_some_code_valid(ages, sex_ids)
        banned = self._banned(exclude, required, ages, sex_ids, validity_mask)
        n = len(sexes)
        seeds, index = self._row_keys_of(n, seed, row_seeds, row_indices)
        attempts = None
        if isinstance(parsed, RerankParams):
            if parsed.coherence_weight > 0 and self.cooccurrence is None:
                raise InvalidParametersError(
                    "rerank: coherence_weight > 0 needs the bundle's co-occurrence matrix")
            tokens, loglik = self._rerank(index, ages, sex_ids, required, seeds, parsed,
                                          grammar, validity_mask, batch, banned=banned)
        elif isinstance(parsed, RetrieveEditParams):
            if self.retrieval is None:
                raise InvalidParametersError(
                    "retrieve_edit: this bundle has no retrieval index of training patients")
            tokens, loglik, attempts = self._retrieve_edit(
                index, ages, sex_ids, required, seeds, parsed, grammar, validity_mask, batch,
                banned=banned)
        else:
            if isinstance(parsed, CooccurrenceParams) and parsed.alpha > 0 \
                    and self.cooccurrence is None:
                raise InvalidParametersError(
                    "cooccurrence: this bundle has no co-occurrence matrix")
            prompts = [empty_prompt(self.vocab)] * n
            keys = row_keys(_key_seeds(seeds), index, 0)
            chunk = self._decode(prompts, ages, sex_ids, keys, required, parsed, grammar,
                                 validity_mask, batch, banned=banned)
            tokens, loglik = chunk.tokens, chunk.loglik
        token_lists = [self._trim(row) for row in tokens]
        patients = [Patient(f"{id_prefix}-{seeds[i]}-{index[i]}", float(ages[i]), sexes[i],
                            self._visits(t)) for i, t in enumerate(token_lists)]
        total = time.perf_counter() - started
        return GenerationResult(
            patients=patients, token_ids=token_lists,
            log_likelihood=[float(x) for x in loglik], strategy=strategy,
            params=parsed.model_dump(), seed=seed, attempts=attempts,
            stats={"seconds": total, "model_seconds": self.model_seconds})

    @staticmethod
    def _row_keys_of(n: int, seed: int, row_seeds: Sequence[int] | None,
                     row_indices: Sequence[int] | None) -> tuple[list[int], np.ndarray]:
        """Per row: the request seed (Python ints) and the patient index within its request."""
        if row_seeds is None:
            seeds = [seed] * n
        else:
            seeds = list(row_seeds)
            if len(seeds) != n:
                raise InvalidParametersError(
                    f"row_seeds: one seed per patient ({n}), got {len(seeds)}")
            for r, s in enumerate(seeds):
                if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0:
                    raise InvalidParametersError(
                        f"row_seeds[{r}]: must be a non-negative integer, got {s!r}")
            seeds = [int(s) for s in seeds]
        if row_indices is None:
            index = np.arange(n)
        else:
            index = np.asarray(list(row_indices), dtype=np.int64).reshape(-1)
            if index.size != n:
                raise InvalidParametersError(
                    f"row_indices: one index per patient ({n}), got {index.size}")
            if n and index.min() < 0:
                raise InvalidParametersError("row_indices: must be non-negative")
        return seeds, index

    def _check_some_code_valid(self, ages: np.ndarray, sex_ids: np.ndarray) -> None:
        groups = sorted({(int(a), int(s)) for a, s in zip(ages, sex_ids, strict=True)})
        g_age = np.asarray([g[0] for g in groups], dtype=np.float64)
        g_sex = np.asarray([g[1] for g in groups], dtype=np.int64)
        ok = self.validity.mask(g_age, g_sex)[:, N_SPECIAL:].any(axis=1)
        if not ok.all():
            age, sex = groups[int(np.flatnonzero(~ok)[0])]
            raise ImpossibleConstraintError(
                f"no vocabulary code is valid for age {age}, sex {'FM'[sex]} under the MCE "
                "edits; switch validity_mask off")

    # -- token sequences -> patients ----------------------------------------------------------
    @staticmethod
    def _trim(row: np.ndarray) -> list[int]:
        ends = np.flatnonzero(row == EOS_ID)
        return row[: int(ends[0]) + 1].tolist() if ends.size else row.tolist()

    def _visits(self, tokens: Sequence[int]) -> tuple[tuple[str, ...], ...]:
        visits, current = [], None
        for t in tokens:
            if t == VISIT_ID:
                current = []
            elif t == END_VISIT_ID and current is not None:
                visits.append(tuple(current))
                current = None
            elif t >= N_SPECIAL and current is not None:
                current.append(self.vocab.tokens[t])
        return tuple(visits)

    def _code_ids(self, tokens: Sequence[int], shift: bool = True) -> list[list[int]]:
        """Each closed visit's codes: code indices, or token ids with ``shift=False``."""
        offset = N_SPECIAL if shift else 0
        visits, current = [], None
        for t in tokens:
            if t == VISIT_ID:
                current = []
            elif t == END_VISIT_ID and current is not None:
                visits.append(current)
                current = None
            elif t >= N_SPECIAL and current is not None:
                current.append(int(t) - offset)
        return visits

    # -- the decoding loop --------------------------------------------------------------------
    def _banned(self, exclude: Sequence[str] | None, required: list[list[int]],
                ages: np.ndarray, sex_ids: np.ndarray, validity_mask: bool) -> np.ndarray | None:
        """Token ids of the excluded codes (None: nothing excluded), after checking that no
        required code is excluded and that every patient keeps at least one code."""
        if not exclude:
            return None
        try:
            banned = np.unique([self._code_token(c) for c in exclude]).astype(np.int64)
        except UnknownCodeError as err:
            raise UnknownCodeError(str(err).replace("must_include:", "exclude:", 1)) from None
        from app.decoding.targeting import TargetError  # (an ImpossibleConstraintError)

        for i, ids in enumerate(required):
            clash = set(ids) & set(banned.tolist())
            if clash:
                code = self.vocab.tokens[min(clash)]
                raise TargetError("exclude", f"code {code} is both required and excluded for "
                                  f"patient {i}")
        ok = (self.validity.mask(ages, sex_ids) if validity_mask
              else np.ones((ages.size, len(self.vocab)), dtype=bool))
        ok[:, :N_SPECIAL] = False
        ok[:, banned] = False
        empty = np.flatnonzero(~ok.any(axis=1))
        if empty.size:
            raise TargetError("exclude", f"no code is left for patient {int(empty[0])} (age "
                              f"{ages[empty[0]]:g}) once the excluded codes are removed")
        return banned

    def _decode(self, prompts: Sequence[Sequence[int]], ages: np.ndarray, sex_ids: np.ndarray,
                keys: np.ndarray, required: Sequence[Sequence[int]], params: PlainParams,
                grammar: Grammar, validity_mask: bool, batch: int, repeat: int = 1,
                calibrate: bool = True,
                banned: np.ndarray | None = None) -> _Chunk:
        """Decode ``len(prompts) * repeat`` rows (row ``i * repeat + j`` = patient ``i``)."""
        n = len(prompts)
        per_chunk = max(1, batch // repeat)
        decode = self._decode_chunk if self.windows is None else self._decode_rolling
        parts = []
        for lo in range(0, n, per_chunk):
            hi = min(n, lo + per_chunk)
            parts.append(decode(
                prompts[lo:hi], ages[lo:hi], sex_ids[lo:hi], keys[lo * repeat:hi * repeat],
                required[lo:hi], params, grammar, validity_mask, repeat, banned, calibrate))
        if not parts:
            return _Chunk(np.zeros((0, grammar.max_length), dtype=np.int64),
                          np.zeros(0), np.zeros(0, dtype=np.int64))
        width = max(p.tokens.shape[1] for p in parts)  # rolled patients may be longer
        return _Chunk(np.concatenate([_pad_width(p.tokens, width) for p in parts]),
                      np.concatenate([p.loglik for p in parts]),
                      np.concatenate([p.n_tokens for p in parts]))

    def _decode_chunk(self, prompts: Sequence[Sequence[int]], ages: np.ndarray,
                      sex_ids: np.ndarray, keys: np.ndarray, required: Sequence[Sequence[int]],
                      params: PlainParams, grammar: Grammar, validity_mask: bool,
                      repeat: int, banned: np.ndarray | None = None,
                      calibrate: bool = True, model_ages: np.ndarray | None = None,
                      visits_before: np.ndarray | None = None,
                      plan_keys: np.ndarray | None = None) -> _Chunk:
        """Decode one window of ``len(prompts) * repeat`` rows. ``ages`` drive the validity
        mask, ``model_ages`` (default ``ages``) the model; ``visits_before``: visits the rows
        have from earlier windows (a rolling continuation); ``plan_keys`` (default ``keys``):
        the rows' keys of a two-stage plan, the first window's in a continuation."""
        vocab_size = len(self.vocab)
        pad_id, bos_id = self.vocab.index[PAD], self.vocab.index[BOS]
        ids, attention = pad_prompts(prompts, pad_id)
        tick = time.perf_counter()
        state = self.model.start(ids, attention,
                                 np.minimum(ages if model_ages is None else model_ages,
                                            AGE_CAP).astype(np.float32),
                                 sex_ids.astype(np.int64))
        rep = np.repeat(np.arange(len(prompts)), repeat)
        if repeat > 1:
            state = self.model.select(state, rep)
        self.model_seconds += time.perf_counter() - tick
        rows = rep.size
        if validity_mask:
            code_ok = self.validity.mask(ages[rep], sex_ids[rep])
        else:
            code_ok = np.ones((rows, vocab_size), dtype=bool)
        if banned is not None:
            code_ok[:, banned] = False  # excluded codes: never sampled
        req = np.zeros((rows, vocab_size), dtype=bool)
        for row, patient in enumerate(rep):
            req[row, list(required[patient])] = True
        gstate = grammar.initial(req, visits_before)
        alpha = params.alpha if isinstance(params, CooccurrenceParams) else 0.0
        bias = (CooccurrenceBias(self.cooccurrence, rows, vocab_size, alpha,
                                 bool(getattr(params, "normalize", False)),
                                 getattr(params, "bias", "count"))
                if alpha > 0 else None)
        keep_length = bool(getattr(params, "keep_visit_length", True))
        plan = self.length_plan if calibrate and getattr(params, "two_stage", False) else None
        plan_keys = keys if plan_keys is None else plan_keys
        length = grammar.max_length
        out = np.full((rows, length), pad_id, dtype=np.int64)
        out[:, 0] = bos_id
        loglik = np.zeros(rows, dtype=np.float64)
        n_tokens = np.zeros(rows, dtype=np.int64)
        active = np.arange(rows)
        feed = np.full((rows, 1), bos_id, dtype=np.int64)
        if grammar.rolling:  # what each row keeps should it fill the window (app.windows)
            kept = np.ones(rows, dtype=np.int64)
            kept_ll, kept_n = np.zeros(rows, dtype=np.float64), np.zeros(rows, dtype=np.int64)
        for t in range(1, length):
            tick = time.perf_counter()
            logp, state = self.model.step(state, feed)
            self.model_seconds += time.perf_counter() - tick
            allowed = grammar.allowed(gstate, code_ok)
            live = gstate.phase != DONE
            in_visit = gstate.phase == IN_VISIT
            scores = logp
            if calibrate and self.calibration is not None:
                scores = self.calibration.apply(scores, gstate.phase == AFTER_VISIT,
                                                gstate.n_visits, in_visit, gstate.n_codes,
                                                EOS_ID, END_VISIT_ID)
            if plan is not None:
                scores = plan.apply(scores, plan_keys[active], gstate.phase == AFTER_VISIT,
                                    gstate.n_visits, in_visit, gstate.n_codes, EOS_ID,
                                    VISIT_ID, END_VISIT_ID, N_SPECIAL)
            if bias is not None and in_visit.any():
                # on the calibrated scores: the bias moves codes, the calibration the stops
                scores = _biased(scores, bias.bias, allowed, keep_length)
            width = vocab_size if in_visit.any() else N_SPECIAL
            tok = sample_tokens(scores[:, :width], allowed[:, :width],
                                uniforms(keys[active], t), params.temperature,
                                params.top_k, params.top_p)
            lr = np.flatnonzero(live)
            loglik[active[lr]] += logp[lr, tok[lr]]
            n_tokens[active[lr]] += 1
            if bias is not None:
                bias.add(np.flatnonzero(live & (tok >= N_SPECIAL)), tok[live & (tok >= N_SPECIAL)])
                bias.reset(np.flatnonzero(live & (tok == END_VISIT_ID)))
            grammar.advance(gstate, tok)
            out[active, t] = tok
            if grammar.rolling and t <= length - 2:  # a </v> followed by a token in the window
                closed = active[np.flatnonzero(live & (tok == END_VISIT_ID))]
                kept[closed], kept_ll[closed], kept_n[closed] = t + 1, loglik[closed], \
                    n_tokens[closed]
            done = gstate.phase == DONE
            n_done = int(done.sum())
            if n_done == done.size:
                break
            if n_done and n_done * 4 >= done.size:
                keep = np.flatnonzero(~done)
                tick = time.perf_counter()
                state = self.model.select(state, keep)
                self.model_seconds += time.perf_counter() - tick
                gstate = gstate.take(keep)
                code_ok = code_ok[keep]
                if bias is not None:
                    bias.take(keep)
                active, tok = active[keep], tok[keep]
            feed = tok[:, None]
        if grammar.rolling:
            return _Chunk(out, loglik, n_tokens, kept, kept_ll, kept_n)
        return _Chunk(out, loglik, n_tokens)

    def _decode_rolling(self, prompts: Sequence[Sequence[int]], ages: np.ndarray,
                        sex_ids: np.ndarray, keys: np.ndarray,
                        required: Sequence[Sequence[int]], params: PlainParams,
                        grammar: Grammar, validity_mask: bool, repeat: int,
                        banned: np.ndarray | None = None, calibrate: bool = True) -> _Chunk:
        """:meth:`_decode_chunk` for long patients: rows that fill a window without ``</s>``
        go on in continuation windows (:mod:`app.windows`) until ``</s>`` or the visit limit.

        Window ``w > 0`` of a row draws from its own stream (the row's key mixed with ``w``),
        so a patient's output still depends on its seed and index only.
        """
        assert self.windows is not None
        first = self._decode_chunk(prompts, ages, sex_ids, keys, required, params, grammar,
                                   validity_mask, repeat, banned, calibrate)
        rep = np.repeat(np.arange(len(prompts)), repeat)
        row_ages, row_sex = ages[rep], sex_ids[rep]
        rows = first.tokens.shape[0]
        pieces: list[list[np.ndarray]] = [[] for _ in range(rows)]
        visits: list[list[list[int]]] = [[] for _ in range(rows)]
        loglik, n_tokens = first.loglik.copy(), first.n_tokens.copy()
        pending = self._take_window(first, np.arange(rows), pieces, visits, loglik, n_tokens,
                                    head=0)
        window = 1
        while pending.size:
            nv = np.asarray([len(visits[r]) for r in pending], dtype=np.int64)
            if window > grammar.max_visits:  # unreachable: every window keeps a visit
                break
            ages_w = row_ages[pending] + nv * self.windows.years_per_visit
            keys_w = row_keys(keys[pending], np.full(pending.size, window), _WINDOW_STREAM)
            chunk = self._decode_chunk(
                [self.windows.prompt(visits[r]) for r in pending], row_ages[pending],
                row_sex[pending], keys_w, [()] * pending.size, params, grammar, validity_mask,
                1, banned, calibrate, model_ages=ages_w, visits_before=nv,
                plan_keys=keys[pending])
            pending = self._take_window(chunk, pending, pieces, visits, loglik, n_tokens, head=1)
            window += 1
        for r in pending:  # (defensive) end a patient that could not go on
            pieces[r].append(np.asarray([EOS_ID], dtype=np.int64))
        tokens = [np.concatenate(p) for p in pieces]
        width = max(grammar.max_length, max((t.size for t in tokens), default=0))
        out = np.full((rows, width), self.vocab.index[PAD], dtype=np.int64)
        for r, t in enumerate(tokens):
            out[r, : t.size] = t
        return _Chunk(out, loglik, n_tokens)

    def _take_window(self, chunk: _Chunk, rows: np.ndarray, pieces: list[list[np.ndarray]],
                     visits: list[list[list[int]]], loglik: np.ndarray, n_tokens: np.ndarray,
                     head: int) -> np.ndarray:
        """Append each row's part of a decoded window (from token ``head``: 0 keeps ``<s>``)
        and return the rows that filled it without ``</s>`` (to be continued)."""
        assert chunk.kept is not None and chunk.kept_loglik is not None \
            and chunk.kept_n_tokens is not None
        go_on = []
        for j, r in enumerate(rows):
            row = chunk.tokens[j]
            ends = np.flatnonzero(row == EOS_ID)
            if ends.size:
                part = row[head: int(ends[0]) + 1]
                ll, nt = chunk.loglik[j], chunk.n_tokens[j]
            else:
                part = row[head: int(chunk.kept[j])]
                ll, nt = chunk.kept_loglik[j], chunk.kept_n_tokens[j]
                go_on.append(r)
            pieces[r].append(part)
            visits[r].extend(self._code_ids(part, shift=False))
            if head:  # a continuation: add to the earlier windows' totals
                loglik[r] += ll
                n_tokens[r] += nt
            else:
                loglik[r], n_tokens[r] = ll, nt
        return np.asarray(go_on, dtype=np.int64)

    # -- rerank -------------------------------------------------------------------------------
    def _rerank(self, index: np.ndarray, ages: np.ndarray, sex_ids: np.ndarray,
                required: list[list[int]], seeds: list[int], params: RerankParams,
                grammar: Grammar, validity_mask: bool,
                batch: int, banned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        k = params.candidates
        n = index.size
        prompts = [empty_prompt(self.vocab)] * n
        keys = row_keys(np.repeat(_key_seeds(seeds), k), np.repeat(index, k),
                        np.tile(np.arange(k), n))
        chunk = self._decode(prompts, ages, sex_ids, keys, required, params, grammar,
                             validity_mask, batch, repeat=k, banned=banned)
        coherence = np.zeros(n * k)
        if params.coherence_weight > 0:
            coherence = self.cooccurrence.coherence_many(
                [self._code_ids(self._trim(r)) for r in chunk.tokens])
        if params.selection == "argmax":
            ll = (chunk.loglik / np.maximum(chunk.n_tokens, 1) if params.per_token
                  else chunk.loglik)
            score = ll + params.coherence_weight * coherence
            best = np.argmax(score.reshape(n, k), axis=1)
        else:
            # Importance resampling: the candidates are model samples, so drawing one with
            # weight exp(w * coherence) targets p(x) exp(w * coherence(x)), not p's mode.
            logw = (params.coherence_weight * coherence).reshape(n, k)
            w = np.exp(logw - logw.max(axis=1, keepdims=True))
            cdf = np.cumsum(w, axis=1)
            u = uniforms(row_keys(_key_seeds(seeds), index, _RERANK_STREAM), 0)
            best = np.minimum(np.argmax(cdf > (u * cdf[:, -1])[:, None], axis=1), k - 1)
        best = best + np.arange(n) * k
        return chunk.tokens[best], chunk.loglik[best]

    # -- retrieve and edit --------------------------------------------------------------------
    def _edit_prompt(self, patient: int, age: float, sex: int, seed: int, attempt: int,
                     params: RetrieveEditParams, last: bool) -> list[int]:
        assert self.retrieval is not None
        rng = np.random.default_rng([seed, patient, attempt, 0x5E7])
        near = self.retrieval.nearest(age, sex, params.neighbors)
        if last or near.size == 0:
            return empty_prompt(self.vocab)
        source = self.retrieval.visits(int(near[rng.integers(near.size)]))
        # The encoder reads at most max_prompt_length tokens: later visits go first.
        while len(source) > 1 and 2 + sum(len(v) + 2 for v in source) > self.max_prompt_length:
            source = source[:-1]
        source[0] = source[0][: max(1, self.max_prompt_length - 4)]
        n_codes = sum(len(v) for v in source)
        keep = set(rng.choice(n_codes, size=round(params.keep_fraction * n_codes),
                              replace=False).tolist())
        shown, pos = [], 0
        for visit in source:
            items: list[str | None] = []
            for code in visit:
                items.append(self.vocab.codes[code] if pos in keep else None)
                pos += 1
            shown.append(items)
        return prompt_ids(self.vocab, shown)

    def _retrieve_edit(self, index: np.ndarray, ages: np.ndarray, sex_ids: np.ndarray,
                       required: list[list[int]], seeds: list[int], params: RetrieveEditParams,
                       grammar: Grammar, validity_mask: bool, batch: int,
                       banned: np.ndarray | None = None
                       ) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
        assert self.retrieval is not None
        n = index.size
        key_seeds = _key_seeds(seeds)
        tokens: list[np.ndarray] = [np.zeros(grammar.max_length, dtype=np.int64)] * n
        loglik = np.zeros(n, dtype=np.float64)
        attempts = [0] * n
        pending = np.arange(n)  # positions in the request; index[pending]: key indices
        for attempt in range(params.max_retries + 1):
            last = attempt == params.max_retries and attempt > 0
            prompts = [self._edit_prompt(int(index[i]), float(ages[i]), int(sex_ids[i]),
                                         seeds[i], attempt, params, last) for i in pending]
            keys = row_keys(key_seeds[pending], index[pending], attempt)
            # The stop calibration was fitted on demographics-only prompts; a retrieved
            # patient's prompt already tells the model how many visits to write.
            chunk = self._decode(prompts, ages[pending], sex_ids[pending], keys,
                                 [required[i] for i in pending], params, grammar,
                                 validity_mask, batch, banned=banned, calibrate=False)
            visits = [self._code_ids(self._trim(r)) for r in chunk.tokens]
            distance = self.retrieval.nearest_distance(
                [[c for v in vs for c in v] for vs in visits])
            copy = np.array([self.retrieval.is_copy(vs) for vs in visits], dtype=bool)
            rejected = copy | (distance <= params.min_distance if params.min_distance > 0
                               else np.zeros_like(copy))
            for j, i in enumerate(pending):
                attempts[i] = attempt + 1
                if not rejected[j]:
                    tokens[i], loglik[i] = chunk.tokens[j], chunk.loglik[j]
            pending = pending[rejected]
            if pending.size == 0:
                return tokens, loglik, attempts
        raise PrivacyGuardError(
            f"retrieve_edit: {pending.size} patient(s) (first: index {int(index[pending[0]])}) stayed "
            f"within Jaccard distance {params.min_distance} of a training patient after "
            f"{params.max_retries + 1} tries; lower keep_fraction or min_distance, or raise "
            "max_retries")


def length_limits(stats: dict[str, Any]) -> tuple[int, int]:
    """``(visits per patient, codes per visit)`` caps from a bundle's reference statistics:
    the training split's largest patient and visit (20 and 40 where they are absent)."""
    return (max((int(k) for k in stats.get("visits_per_patient", {})), default=20),
            max((int(k) for k in stats.get("codes_per_visit", {})), default=40))


_RERANK_STREAM = 0x52455241  # the selection draw's stream (candidates use streams 0..k-1)
_WINDOW_STREAM = 0x57494E44  # continuation windows: the row's key mixed with the window number


def _pad_width(tokens: np.ndarray, width: int, pad_id: int = 0) -> np.ndarray:
    """``tokens [R, L]`` right-padded with ``pad_id`` to ``[R, width]``."""
    if tokens.shape[1] >= width:
        return tokens
    out = np.full((tokens.shape[0], width), pad_id, dtype=tokens.dtype)
    out[:, : tokens.shape[1]] = tokens
    return out


def _key_seeds(seeds: Sequence[int]) -> np.ndarray:
    """Request seeds as the ``uint64`` row keys take them (the low 64 bits)."""
    return np.asarray([s & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64)


def _biased(logp: np.ndarray, bias: np.ndarray, allowed: np.ndarray,
            keep_length: bool) -> np.ndarray:
    """``logp + bias`` on code columns; with ``keep_length`` the allowed codes keep their mass."""
    scores = logp.copy()
    codes = scores[:, N_SPECIAL:]
    biased = codes + bias[:, N_SPECIAL:]
    if keep_length:
        ok = allowed[:, N_SPECIAL:]
        before = _logsumexp(np.where(ok, codes, -np.inf))
        after = _logsumexp(np.where(ok, biased, -np.inf))
        with np.errstate(invalid="ignore"):
            shift = np.where(np.isfinite(before) & np.isfinite(after), after - before, 0.0)
        biased -= shift[:, None].astype(np.float32)
    scores[:, N_SPECIAL:] = biased
    return scores


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(x - safe[:, None]).sum(axis=1))
