"""Cohort targeting: ``any_of`` and ``exclude`` over a bundle's vocabulary, through the
decoder's masks.

* Entries are ICD-9-CM codes (``25000``), subcategories (``2500``) or 3-character categories
  (``250``, ``V30``, ``E812``); an entry stands for every code of the vocabulary that starts with
  it (a category: all its codes). An entry with no code in the
  vocabulary is refused (:class:`TargetError` naming the field and the entry).
* ``exclude``: the expanded codes are masked out of every decoding step (the engine's
  ``exclude``), so they are never generated.
* ``any_of``: each patient must carry at least one code of the expanded list
  (:meth:`Targeting.sample_any_of`). First by rejection: patients are decoded as usual (the
  first try with the request's own seed, so a patient that already carries a code of the list is
  exactly the untargeted one) and those without a code of the list are decoded again with a
  seed derived from the request's seed and the try, up to ``ANY_OF_TRIES`` tries; this samples
  the model's own distribution given the condition. Tries stop early when one accepts fewer than
  ``MIN_ACCEPT`` of the patients left (a rare condition would cost many tries). The patients
  still left get one code of the list as a required code, drawn with probability proportional
  to its training frequency among the codes that patient may carry (valid for its age and sex
  under the validity mask, not excluded), from a stream seeded by the request's seed and the
  patient's index; the grammar refuses ``</s>`` until it is emitted, and everything else is
  sampled from the model.
* :meth:`Targeting.check` tells, before any decoding, whether a spec can be met for every age
  (whole years, as the MCE counts them) and sex a cohort may draw: required codes valid for
  all of them, ``any_of`` leaving each at least one code, ``exclude`` neither removing a required
  code nor every code a patient could carry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from app.corpus import SEX_IDS
from app.decoding.errors import ImpossibleConstraintError
from app.decoding.validity import ValidityMask
from app.icd9.codes import category_of
from app.vocab import Vocabulary

__all__ = ["ANY_OF_TRIES", "MIN_ACCEPT", "TargetError", "Targeting"]

_ANY_OF_STREAM = 0xA11F
ANY_OF_TRIES = 8
MIN_ACCEPT = 0.05


def _try_seed(seed: int, attempt: int) -> int:
    """The seed of rejection try ``attempt`` (the request's own seed for the first)."""
    if attempt == 0:
        return int(seed)
    mixed = np.random.default_rng([int(seed), attempt, _ANY_OF_STREAM]).integers(2**63)
    return int(mixed)


class TargetError(ImpossibleConstraintError):
    """A targeting spec that cannot be met; ``field`` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _is_category(entry: str) -> bool:
    return entry == category_of(entry)


class Targeting:
    """``any_of`` / ``exclude`` over one vocabulary and validity mask."""

    def __init__(self, vocab: Vocabulary, validity: ValidityMask) -> None:
        self.vocab = vocab
        self.validity = validity
        self._by_category: dict[str, list[str]] = {}
        for code in vocab.codes:
            self._by_category.setdefault(category_of(code), []).append(code)
        self._counts = dict(zip(vocab.codes, np.asarray(vocab.counts, dtype=float),
                                strict=True))

    def expand(self, entries: Iterable[str], field: str) -> list[str]:
        """Vocabulary codes of canonical ``entries`` (codes or categories), in order, unique."""
        out: list[str] = []
        for i, entry in enumerate(entries):
            codes = [c for c in self._by_category.get(category_of(entry), [])
                     if c.startswith(entry)]
            if not codes:
                kind = "category" if _is_category(entry) else "code"
                raise TargetError(f"{field}.{i}", f"{kind} {entry} has no code in the model's "
                                  "vocabulary (it never occurred in its training data)")
            out.extend(c for c in codes if c not in out)
        return out

    def _allowed(self, ages: np.ndarray, sexes: Sequence[str], validity_mask: bool,
                 codes: Sequence[str]) -> np.ndarray:
        """Bool ``[patients, len(codes)]``: code allowed for the patient by the validity mask."""
        ids = np.asarray([self.vocab.index[c] for c in codes], dtype=np.int64)
        if not validity_mask:
            return np.ones((len(sexes), ids.size), dtype=bool)
        sex_ids = np.asarray([SEX_IDS[s] for s in sexes], dtype=np.int8)
        return self.validity.mask(np.asarray(ages, dtype=float), sex_ids)[:, ids]

    def check(self, ages: Iterable[int], sexes: Iterable[str], must_include: Sequence[str],
              any_of: Sequence[str], exclude: Sequence[str], validity_mask: bool) -> None:
        """Raise :class:`TargetError` unless every (age, sex) combination can meet the spec
        (codes already expanded to the vocabulary)."""
        combos = [(float(a), s) for s in sorted(set(sexes)) for a in sorted(set(ages))]
        if not combos:
            return
        excluded = set(exclude)
        for code in must_include:
            if code in excluded:
                raise TargetError("exclude", f"code {code} is also in must_include")
        ages_arr = np.asarray([a for a, _ in combos])
        sex_list = [s for _, s in combos]
        if validity_mask and must_include:
            ok = self._allowed(ages_arr, sex_list, True, must_include)
            bad = np.argwhere(~ok)
            if bad.size:
                row, col = bad[0]
                code = must_include[col]
                reason = self.validity.violation(code, ages_arr[row], sex_list[row])
                raise TargetError("must_include", f"code {code} is impossible for some patients "
                                  f"of this cohort (age {ages_arr[row]:g}, sex {sex_list[row]}): "
                                  f"{reason}; narrow the cohort's ages or female_fraction, or "
                                  "switch validity_mask off")
        if any_of:
            left = [c for c in any_of if c not in excluded]
            if not left:
                raise TargetError("exclude", "every any_of code is excluded")
            ok = self._allowed(ages_arr, sex_list, validity_mask, left).any(axis=1)
            if not ok.all():
                row = int(np.flatnonzero(~ok)[0])
                raise TargetError("any_of", f"no any_of code is possible for some patients of "
                                  f"this cohort (age {ages_arr[row]:g}, sex {sex_list[row]}) "
                                  "under the validity mask")
        if excluded:
            left = [c for c in self.vocab.codes if c not in excluded]
            if not left or not self._allowed(ages_arr, sex_list, validity_mask,
                                             left).any(axis=1).all():
                raise TargetError("exclude", "the excluded codes remove every code some "
                                  "patients of this cohort could carry")

    def sample_any_of(self, engine, demographics: Sequence[tuple[float, str]],
                      any_of: Sequence[str], *, strategy: str, params: dict | None, seed: int,
                      must_include: Sequence[str], exclude: Sequence[str],
                      validity_mask: bool, row_seeds: Sequence[int] | None = None,
                      row_indices: Sequence[int] | None = None,
                      should_stop: Callable[[], bool] | None = None, step: int | None = None,
                      stopped: type[Exception] = RuntimeError) -> list:
        """Patients (``app.corpus.Patient``) each carrying a code of ``any_of`` (expanded
        codes), decoded by ``engine`` (see the module docstring).

        Patient ``i`` is keyed on ``row_seeds[i]`` and ``row_indices[i]`` (default: ``seed``
        and ``i``), as the engine keys its rows. With ``should_stop``, each try is decoded
        ``step`` patients per engine call (the engine's rows do not depend on their batch, so
        the patients are the same) and ``should_stop`` is asked before each call; when it says
        yes, ``stopped`` is raised."""
        target = set(any_of) - set(exclude)
        n = len(demographics)
        seeds = [int(s) for s in row_seeds] if row_seeds is not None else [int(seed)] * n
        indices = [int(i) for i in row_indices] if row_indices is not None else list(range(n))
        out: list = [None] * n
        pending = list(range(n))
        common = {"strategy": strategy, "params": params or {}, "validity_mask": validity_mask,
                  **({"exclude": list(exclude)} if exclude else {})}

        def decode(rows: list[int], attempt: int, required: list[list[str]]) -> list:
            """Try ``attempt`` of ``rows``, row ``rows[k]`` with required codes
            ``required[k]``."""
            size = max(1, step or len(rows)) if should_stop is not None else len(rows)
            patients: list = []
            for lo in range(0, len(rows), size):
                if should_stop is not None and should_stop():
                    raise stopped(f"stopped with {len(pending)} of {n} patients to decode")
                part = rows[lo:lo + size]
                trials = [_try_seed(seeds[i], attempt) for i in part]
                must = required[lo:lo + size]
                result = engine.generate([demographics[i] for i in part], seed=trials[0],
                                         row_seeds=trials, row_indices=[indices[i] for i in part],
                                         must_include=must if any(must) else None, **common)
                patients.extend(result.patients)
            return patients

        for attempt in range(ANY_OF_TRIES):
            patients = decode(pending, attempt, [list(must_include)] * len(pending))
            left = []
            for i, patient in zip(pending, patients, strict=True):
                if any(c in target for visit in patient.visits for c in visit):
                    out[i] = patient
                else:
                    left.append(i)
            accepted = len(pending) - len(left)
            rare = accepted < MIN_ACCEPT * len(pending)
            pending = left
            if not pending or rare:
                break
        if pending:
            part = [demographics[i] for i in pending]
            chosen = self.choose(sorted(target), part, exclude, validity_mask,
                                 [seeds[i] for i in pending], [indices[i] for i in pending])
            patients = decode(pending, ANY_OF_TRIES, [[*must_include, code] for code in chosen])
            for i, patient in zip(pending, patients, strict=True):
                out[i] = patient
        return out

    def choose(self, any_of: Sequence[str], demographics: Sequence[tuple[float, str]],
               exclude: Sequence[str], validity_mask: bool, seeds: Sequence[int],
               indices: Sequence[int]) -> list[str]:
        """Per patient the ``any_of`` code it will carry (see the module docstring)."""
        excluded = set(exclude)
        codes = [c for c in any_of if c not in excluded]
        if not codes:
            raise TargetError("exclude", "every any_of code is excluded")
        weights = np.asarray([max(self._counts[c], 1.0) for c in codes])
        ages = np.asarray([a for a, _ in demographics], dtype=float)
        ok = self._allowed(ages, [s for _, s in demographics], validity_mask, codes)
        chosen = []
        for i, (age, sex) in enumerate(demographics):
            w = weights * ok[i]
            if w.sum() <= 0:
                raise TargetError("any_of", f"no any_of code is possible for patient {i} "
                                  f"(age {age:g}, sex {sex}) under the validity mask")
            rng = np.random.default_rng([int(seeds[i]), int(indices[i]), _ANY_OF_STREAM])
            cdf = np.cumsum(w) / w.sum()
            chosen.append(codes[min(int(np.searchsorted(cdf, rng.random(), side="right")),
                                    len(codes) - 1)])
        return chosen
