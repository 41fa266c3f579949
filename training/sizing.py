"""The default recipe chosen from the corpus: model size, positions, batch and time budget.

A user who runs ``synthehr train`` with no flags gets a recipe fitted to their data, not to one
data set: :func:`corpus_profile` measures the training split (patients, distinct codes, codes
per visit, patient lengths in tokens) and :func:`recipe_for` turns it into run-config
overrides, each with the reason, recorded in the manifest as ``model_choice``. ``--size``,
``--config`` and ``--set`` still override every part.

Rules (documented in the README):

* size: ``tiny`` under 150k training tokens, ``small`` under 3M, ``base`` above;
* ``model.max_positions``: the 99.9th percentile of patient lengths, rounded up to a multiple of
  32, between 32 and 512 (:func:`app.windows.positions_for`); longer patients are trained on as
  windows of consecutive visits and generated window by window (:mod:`app.windows`), so no
  visit is lost and the cap only bounds attention cost (counted in the log and the manifest);
* ``train.batch_size``: about 2,048 tokens per batch (a power of two between 16 and 256), and
  at least 8 batches per epoch;
* ``train.max_minutes``: 45, or 90 where the vocabulary has more than 3,000 codes (the CPU
  budgets of the defaults on 2 cores: UCI-shaped and MIMIC-shaped corpora);
* ``model.ffn_dim``: 256 for ``small`` on a vocabulary of at most 3,000 codes (else the size's);
* ``train.warmup_steps``: left to :func:`training.schedule.warmup_for` (half an epoch at most).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from app.corpus import Patient
from app.windows import MAX_POSITIONS_CAP, positions_for

__all__ = ["CorpusProfile", "corpus_profile", "recipe_for"]


@dataclass(frozen=True)
class CorpusProfile:
    n_patients: int
    n_codes: int
    codes_per_visit: float
    visits_per_patient: float
    tokens: int  # all patient tokens: 2 + sum(codes + 2) per patient
    length_p50: float
    length_p99: float
    length_p999: float
    length_max: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def patient_length(patient: Patient) -> int:
    """Decoder tokens of a patient: ``<s> (<v> codes </v>)* </s>``."""
    return 2 + sum(len(v) + 2 for v in patient.visits)


def corpus_profile(patients: Sequence[Patient]) -> CorpusProfile:
    """The statistics the recipe depends on (use the training split)."""
    if not patients:
        raise ValueError("an empty corpus has no recipe")
    lengths = np.array([patient_length(p) for p in patients])
    n_visits = sum(len(p.visits) for p in patients)
    n_code_rows = sum(len(v) for p in patients for v in p.visits)
    codes = {c for p in patients for v in p.visits for c in v}
    return CorpusProfile(
        n_patients=len(patients), n_codes=len(codes),
        codes_per_visit=n_code_rows / max(n_visits, 1),
        visits_per_patient=n_visits / len(patients), tokens=int(lengths.sum()),
        length_p50=float(np.percentile(lengths, 50)),
        length_p99=float(np.percentile(lengths, 99)),
        length_p999=float(np.percentile(lengths, 99.9)), length_max=int(lengths.max()))


def _pow2(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 2 ** round(math.log2(max(x, 1.0))))))


# DP-SGD adds noise of a fixed size to each batch's summed clipped gradients, so a larger batch
# carries less noise per example at the same epsilon: on UCI at epsilon 8 (2 DP epochs, 25
# minutes) batch 1024 with lr 4e-3 gave bigram R2 0.821 against 0.787 at the plain recipe's
# 256 and 2e-3 (bench/privacy_results.md).
DP_BATCH_FACTOR = 4
DP_MAX_BATCH = 1024
DP_LR = 4e-3


def recipe_for(profile: CorpusProfile, dp: bool = False
               ) -> tuple[str, dict[str, Any], dict[str, str]]:
    """``(size, run-config overrides, reasons)`` for a corpus of this profile; ``dp``: the
    recipe of a differentially private run (larger batches, a higher learning rate)."""
    reasons: dict[str, str] = {}
    if profile.tokens < 150_000:
        size = "tiny"
    elif profile.tokens < 3_000_000:
        size = "small"
    else:
        size = "base"
    reasons["size"] = f"{profile.tokens:,} training tokens"
    positions = positions_for(profile.length_p999)
    reasons["model.max_positions"] = (f"99.9th percentile of patient lengths "
                                      f"{profile.length_p999:.0f} tokens (max "
                                      f"{profile.length_max}; at most {MAX_POSITIONS_CAP}, "
                                      f"longer patients are windowed)")
    mean_length = profile.tokens / profile.n_patients
    batch = _pow2(2048 / mean_length, 16, 256)
    batch = max(16, min(batch, _pow2(profile.n_patients / 8, 16, 256)))
    reasons["train.batch_size"] = f"about 2,048 tokens per batch at {mean_length:.1f} per patient"
    budget = 90.0 if profile.n_codes > 3000 else 45.0
    reasons["train.max_minutes"] = f"{profile.n_codes:,} distinct codes"
    overrides = {"model.max_positions": positions, "train.batch_size": batch,
                 "train.max_minutes": budget}
    if dp:
        dp_batch = max(batch, min(DP_MAX_BATCH, DP_BATCH_FACTOR * batch,
                                  _pow2(profile.n_patients / 8, 16, DP_MAX_BATCH)))
        overrides.update({"train.batch_size": dp_batch, "train.lr": DP_LR})
        reasons["train.batch_size"] = (f"differential privacy: {DP_BATCH_FACTOR}x the plain "
                                       f"recipe's {batch} (at most {DP_MAX_BATCH}): less "
                                       "noise per example at the same epsilon")
        reasons["train.lr"] = "differential privacy: larger batches, a higher rate"
    if profile.n_codes > 3000:
        overrides["objective.marginal_weight"] = 0.0
        reasons["objective.marginal_weight"] = (
            f"{profile.n_codes:,} distinct codes: moment matching won on UCI (894 codes) but not "
            "on mimic3-scale (bigram R2 0.529 against 0.548 without it after 3 epochs; "
            "bench/fidelity_results.md)")
    if size == "small" and profile.n_codes <= 3000:
        overrides["model.ffn_dim"] = 256
        reasons["model.ffn_dim"] = "a vocabulary of at most 3,000 codes: half the usual width"

    return size, overrides, reasons
