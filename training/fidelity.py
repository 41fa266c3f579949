"""A cheap fidelity score of a model during training, drawn with the real decoding engine.

Checkpoint selection and early stopping judge a model by what the product is judged by: a plain
cohort conditioned on (a fixed subsample of) the **validation** split's demographics, decoded by
:class:`app.decoding.engine.Engine` over the torch model (:class:`training.torch_step.
TorchStepModel`, the same loop the ONNX graphs run under), and scored against those validation
patients with the protocol's own metrics (:mod:`app.evaluation`). The test split is never used.

``score = (bigram R2 + unigram R2) / 2 - 0.5 * KS(visits per patient)``: higher is better,
measured after one step of the stop calibration (the bundle is calibrated after training).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.corpus import Patient
from app.decoding.calibration import StopCalibration
from app.decoding.engine import Engine
from app.evaluation.fidelity import bigram_r2, unigram_r2
from app.evaluation.structure import ks_codes_per_visit, ks_visits_per_patient
from app.vocab import Vocabulary
from app.windows import WindowRule

__all__ = ["cohort_fidelity", "cycled_demographics", "fidelity_score", "sample_engine", "validation_fidelity", "validation_subsample"]


def validation_subsample(patients: Sequence[Patient], n: int, seed: int) -> list[Patient]:
    """A seed-deterministic subsample of ``n`` patients (all of them when ``n`` <= 0 or more)."""
    if n <= 0 or n >= len(patients):
        return list(patients)
    keep = np.sort(np.random.default_rng(seed).choice(len(patients), size=n, replace=False))
    return [patients[i] for i in keep]


def sample_engine(model: Any, vocab: Vocabulary, *, max_visits: int, max_codes: int,
                  batch_size: int = 256, calibration: StopCalibration | None = None,
                  windows: WindowRule | None = None, code_order: str = "shuffle") -> Engine:
    """The serving engine over the torch model (limits, the long-patient window rule and the
    in-visit code order, as the bundle's engine will have them)."""
    from training.torch_step import TorchStepModel

    return Engine(TorchStepModel(model), vocab, max_visits=max_visits,
                  max_codes_per_visit=max_codes, max_length=model.config.max_positions,
                  max_prompt_length=model.config.max_positions, batch_size=batch_size,
                  calibration=calibration, windows=windows, code_order=code_order)


def fidelity_score(metrics: dict[str, float]) -> float:
    """The selection score of :func:`validation_fidelity`'s metrics (higher is better)."""
    return 0.5 * (metrics["bigram_r2"] + metrics["unigram_r2"]) \
        - 0.5 * metrics["ks_visits_per_patient"]


def cohort_fidelity(real: Sequence[Patient], cohort: Sequence[Patient]) -> dict[str, float]:
    """The selection's metrics of ``cohort`` against ``real`` (bigram and unigram R2, the KS of
    visits per patient and codes per visit, mean visits per patient) and its ``score``."""
    out = {"bigram_r2": bigram_r2(real, cohort), "unigram_r2": unigram_r2(real, cohort),
           "ks_visits_per_patient": ks_visits_per_patient(real, cohort),
           "ks_codes_per_visit": ks_codes_per_visit(real, cohort),
           "visits_per_patient": float(np.mean([len(p.visits) for p in cohort])),
           "n": len(real)}
    out["score"] = fidelity_score(out)
    return out


def cycled_demographics(patients: Sequence[Patient], n: int) -> list[tuple[float, str]]:
    """``(age, sex)`` of ``patients``, cycled to at least ``n`` entries (fewer sampling noise
    on a small validation split; demographics only, never records)."""
    demographics = [(p.age, p.sex) for p in patients]
    if not demographics:
        return []
    total = max(n, len(demographics))
    return [demographics[i % len(demographics)] for i in range(total)]


def validation_fidelity(engine: Engine, real: Sequence[Patient], seed: int,
                        min_generated: int = 0,
                        train: Sequence[Patient] | None = None,
                        params: dict[str, Any] | None = None) -> dict[str, float]:
    """Protocol metrics of a plain cohort conditioned on ``real``'s demographics (one-to-one,
    cycled to at least ``min_generated`` patients; the metrics are per-visit prevalences).

    ``params``: the plain strategy's parameters (a temperature, say). With ``train``, the
    cohort is drawn after one step of the stop calibration towards the
    training split's histograms (:func:`training.calibrate.fit_stop_calibration`), as the
    bundle will be: otherwise the visit-count KS, which the calibration fixes afterwards,
    swings by +-0.05 between epochs and decides the selection by sampling noise.
    """
    started = time.perf_counter()
    demographics = cycled_demographics(real, min_generated)
    if train is not None:
        from training.calibrate import fit_stop_calibration

        fit_stop_calibration(engine, demographics, train, iterations=1, seed=seed + 1)
    sampled = time.perf_counter()
    cohort = engine.generate(demographics, "plain", params, seed=seed).patients
    sample_seconds = time.perf_counter() - sampled
    out = cohort_fidelity(real, cohort)
    out["seconds"] = time.perf_counter() - started
    out["sample_seconds"] = sample_seconds  # one cohort's draw
    return out
