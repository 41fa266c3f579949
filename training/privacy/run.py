"""The trainer's one entry point to privacy: small-cell suppression for every run, and for a
DP run (``train.dp_epsilon > 0``) the checked plan, the released statistics and the private
optimizer step (see :mod:`training.privacy.dp_sgd` and :mod:`training.privacy.release`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.corpus import Patient
from app.settings import get_settings
from app.vocab import Vocabulary
from training.config import RunConfig
from training.privacy.dp_sgd import DPPlan, PrivateSGD, plan_dp
from training.privacy.release import STATS_RELEASES, StatsRelease, release_statistics

__all__ = ["PrivacySetup", "prepare_privacy"]

# What a DP bundle cannot offer, with the reason the service gives.
DP_UNAVAILABLE = {
    "cooccurrence": "this bundle was trained with differential privacy and ships no "
                    "co-occurrence matrix (exact pair counts of training visits)",
    "rerank": "this bundle was trained with differential privacy and ships no co-occurrence "
              "matrix, which rerank's coherence score needs",
    "retrieve_edit": "this bundle was trained with differential privacy and ships no "
                     "retrieval index of training patients (it would copy real records "
                     "around the guarantee)",
}


@dataclass
class PrivacySetup:
    """The vocabulary a run trains on, and for a DP run its plan and released statistics."""

    vocab: Vocabulary
    plan: DPPlan | None = None
    release: StatsRelease | None = None
    sgd: PrivateSGD | None = field(default=None, repr=False)

    @property
    def dp(self) -> bool:
        return self.plan is not None

    def describe(self, k: int) -> str:
        """One log line: suppression, and for a DP run the calibrated plan."""
        text = f"small-cell suppression k={k}"
        if self.plan is None:
            return f"{text}: {self.vocab.suppressed} codes removed"
        p = self.plan
        return (f"{text} (on DP-noisy counts); DP: epsilon {p.epsilon:g} (planned "
                f"{p.epsilon_planned:.3f}: statistics alone {p.epsilon_stats_alone:.3f}), delta "
                f"{p.delta:.3g}, noise multiplier {p.noise_multiplier:.3f}, clipping norm "
                f"{p.max_grad_norm:g}, {p.steps} steps over {p.epochs} epochs (sample rate "
                f"{p.sample_rate:.4g}); the budget is spent only if all epochs run")

    def attach(self, model, optimizer, objective, seed: int) -> PrivateSGD | None:
        """For a DP run, the private step over ``model``/``optimizer`` (checks the model)."""
        if self.plan is None:
            return None
        self.sgd = PrivateSGD(model, optimizer, self.plan, objective, seed)
        return self.sgd

    def manifest(self, k: int) -> dict[str, Any]:
        """The manifest's ``privacy`` section."""
        small = {"min_patients_per_code": k, "codes_kept": self.vocab.n_codes}
        if self.plan is None:
            small["codes_removed"] = self.vocab.suppressed
            small["rule"] = f"codes carried by fewer than {k} training patients are left out"
            return {"small_cell_suppression": small, "differential_privacy": None}
        small["codes_removed"] = None  # an exact count of rare codes would bypass DP
        small["rule"] = (f"codes whose DP-noisy training patient count is below {k} are left "
                         "out (the exact number removed is not released)")
        dp = self.sgd.manifest(self.release.info) if self.sgd is not None else {
            "epsilon": None, "plan": self.plan.to_dict()}
        dp["unavailable_strategies"] = DP_UNAVAILABLE
        return {"small_cell_suppression": small, "differential_privacy": dp}


def prepare_privacy(config: RunConfig, train_patients: list[Patient], *,
                    resume: bool = False) -> PrivacySetup:
    """Suppress small cells; for a DP run check the settings, calibrate the noise and release
    the vocabulary and reference statistics. Errors come before any training."""
    tc = config.train
    k = int(tc.min_patients_per_code)
    if k < 1:
        raise ValueError(f"train.min_patients_per_code must be at least 1, got {k}")
    if not tc.dp_epsilon:
        vocab = Vocabulary.from_patients(train_patients, min_patients=k)
        if vocab.n_codes == 0:
            raise ValueError(f"no code is carried by {k} or more of the {len(train_patients):,} "
                             f"training patients; lower train.min_patients_per_code")
        return PrivacySetup(vocab)
    plan = plan_dp(tc, config.objective, len(train_patients), stats_releases=STATS_RELEASES,
                   resume=resume)
    limits = get_settings()
    release = release_statistics(train_patients, min_patients=k,
                                 max_codes_per_patient=tc.dp_max_codes_per_patient,
                                 noise_multiplier=plan.stats_noise_multiplier,
                                 max_visits=limits.max_visits,
                                 max_codes_per_visit=limits.max_codes_per_visit, seed=tc.seed)
    if release.vocab.n_codes == 0:
        raise ValueError(f"no code's DP-noisy patient count reaches {k}: the corpus is too small "
                         f"for --dp-epsilon {tc.dp_epsilon:g}")
    return PrivacySetup(release.vocab, plan, release)
