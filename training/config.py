"""Typed, JSON-serialisable configuration of the model, the training objective and the trainer.

This module also states the **demographics conventions** every producer and consumer of model
inputs uses (:data:`AGE_SCALE`, :data:`SEX_IDS`, :func:`demographics`):

* ``age`` is a float tensor of years (at the first visit, capped at 90); the model normalises it
  internally as ``age / AGE_SCALE``.
* ``sex`` is an int64 tensor, ``0 = F``, ``1 = M`` (:data:`SEX_IDS`, defined once in
  :mod:`app.corpus` with the patient type, for the serving side's masks and index too).

Further demographic features (categorical or numeric) are declared in
:attr:`ModelConfig.extra_features` and passed to the model as keyword tensors.

Pure Python (no torch import), so the serving side can read a bundle's ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.corpus import SEX_IDS, SEXES

__all__ = [
    "AGE_SCALE",
    "SEXES",
    "SEX_IDS",
    "SIZES",
    "FeatureSpec",
    "ModelConfig",
    "ObjectiveConfig",
    "RunConfig",
    "TrainConfig",
    "demographics",
    "model_config_for",
]

# -- demographics conventions -------------------------------------------------------------------
AGE_SCALE = 90.0  # model input: age / AGE_SCALE


def demographics(age: float, sex: str) -> tuple[float, int]:
    """``(age in years, sex id)`` as the model takes them; ValueError on an unknown sex."""
    if sex not in SEX_IDS:
        raise ValueError(f"sex must be one of {', '.join(SEXES)}, got {sex!r}")
    return float(age), SEX_IDS[sex]


class _Json(BaseModel):
    """Base of the run configs: pydantic fields, a plain-dict round trip, unknown keys refused.

    Assignment is not validated: the model fills in its vocabulary sizes in place.
    """

    model_config = ConfigDict(extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        unknown = set(data) - set(cls.model_fields)
        if unknown:  # named here, shorter than pydantic's "extra inputs" error
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls.model_validate(data)


class FeatureSpec(_Json):
    """One extra conditioning feature: ``numeric`` (scaled by ``scale``) or ``categorical``."""

    name: str
    kind: str = "categorical"  # or "numeric"
    n_values: int = 2  # categorical only
    scale: float = 1.0  # numeric only: the model sees value / scale

    def __init__(self, name: str, kind: str = "categorical", n_values: int = 2,
                 scale: float = 1.0) -> None:
        # positional arguments, as callers write them: FeatureSpec("race", n_values=5)
        super().__init__(name=name, kind=kind, n_values=n_values, scale=scale)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str, info: ValidationInfo) -> str:
        if kind not in ("numeric", "categorical"):
            name = info.data.get("name")
            raise ValueError(f"feature {name!r}: kind must be numeric or categorical")
        return kind


class ModelConfig(_Json):
    """Architecture. Vocabulary sizes are filled in from :class:`app.vocab.Vocabulary`."""

    n_tokens: int = 0  # all tokens (special + codes)
    n_special: int = 6
    n_codes: int = 0
    n_categories: int = 0
    n_chapters: int = 19
    hierarchical: bool = True  # False: flat softmax over all tokens (the ablation)
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_function: str = "gelu"
    max_positions: int = 256  # patient tokens (prompts excluded)
    n_prompts_per_feature: int = 1  # learned prompt vectors per demographic feature
    prompt_hidden: int = 128  # PromptEHR's reparametrisation MLP width
    extra_features: list[FeatureSpec] = Field(default_factory=list)
    aux_heads: bool = True  # age regression + sex classification heads (used if weights > 0)

    @property
    def n_features(self) -> int:
        return 2 + len(self.extra_features)

    @property
    def n_prompts(self) -> int:
        """Prompt positions prepended to the encoder input and to the decoder input."""
        return self.n_features * self.n_prompts_per_feature


class ObjectiveConfig(_Json):
    """Encoder corruption and loss weights (see :mod:`training.objective`)."""

    # encoder sees only <s> </s> (+ prompts): the view the service generates from. UCI:
    # validation ppl/code 73 after 4 epochs at 1.0 against 91 at 0.25, and calibrated bigram
    # R2 0.937 at 1.0 against 0.909-0.917 at 0.9 (bench/fidelity_results.md). Below 1.0 the
    # encoder also learns to read a prompt, which retrieve_edit relies on.
    demographics_only_prob: float = 1.0
    truncate_prob: float = 0.25  # keep only the first k visits in the encoder view
    drop_prob: float = 0.15  # each code dropped from the encoder view
    mask_prob: float = 0.15  # share of codes covered by <mask> spans
    span_poisson: float = 2.0  # span lengths ~ 1 + Poisson(lambda - 1)
    cooc_weight: float = 0.0  # co-occurrence regulariser weight
    age_weight: float = 0.0  # auxiliary age regression weight
    sex_weight: float = 0.0  # auxiliary sex classification weight
    label_smoothing: float = 0.0
    # moment matching: KL of the training split's code frequencies from the batch-mean
    # predicted code distribution at code positions (training.objective; off under DP). On UCI
    # it moved test bigram R2 0.909 -> 0.929 and unigram R2 0.986 -> 0.993 (5 epochs); on
    # mimic3-scale it did not help, so the recipe (training.sizing) turns it off past 3,000
    # codes (bench/fidelity_results.md, "Ablation")
    marginal_weight: float = 1.0
    # contrastive pretraining of the code embeddings on the training co-occurrence matrix
    # before training (training.pretrain; 0: none)
    contrastive_steps: int = 0
    # order of the codes inside a visit (a visit is a set): "shuffle" (a new permutation every
    # epoch), "hierarchy" (chapter, category, code: the vocabulary order) or "frequency"
    # (commonest training code first)
    code_order: str = "shuffle"


class TrainConfig(_Json):
    epochs: int = 30  # the most epochs; a time budget plans fewer (training.schedule)
    batch_size: int = 128
    lr: float = 2e-3
    lr_min_ratio: float = 0.05  # the cosine ends at lr * lr_min_ratio
    weight_decay: float = 0.01
    warmup_steps: int = 200  # capped at half an epoch and 5% of the run (training.schedule)
    grad_clip: float = 1.0
    # exponential moving average of the weights (0: off): validation, selection and the bundle
    # use the averaged weights, training continues on the raw ones. Not with DP-SGD.
    ema_decay: float = 0.0
    # epochs without improvement that stop training; counted only once the schedule is this far
    # through (by steps): before it has annealed the learning rate is high and a flat score is
    # expected, and the fidelity score's sampling noise (+-0.02) would stop it by chance
    patience: int = 4
    patience_from: float = 0.75
    min_delta: float = 1e-3  # improvement that counts (relative for nll, absolute for fidelity)
    # checkpoint selection keeps the latest epoch whose score is within this of the best so
    # far (absolute for fidelity, relative for nll): among epochs equal within noise the most
    # annealed one wins, not an early epoch's lucky draw
    select_tolerance: float = 0.01
    seed: int = 0
    # torch threads: 1 by default, since two OpenMP threads on a 2-core machine that is busy
    # with anything else are slower than one (bench/train_threads.py); --threads 2 on an idle one
    threads: int = 1
    # 0: no wall-time budget; else the epochs and the learning-rate schedule are planned from
    # measured step times so that training ends annealed within this many minutes
    max_minutes: float = 0.0
    max_train_patients: int = 0  # 0: all; else a seed-deterministic subsample (for smoke runs)
    eval_batch_size: int = 512
    # token budgets per batch (patients x longest patient; 0: none): memory stays bounded by
    # these whatever the longest patient
    max_batch_tokens: int = 16384
    eval_max_batch_tokens: int = 32768
    # patients longer than model.max_positions: "windows" (windows of consecutive visits, every
    # visit kept; generation rolls over windows: app.windows) or "truncate" (the earliest
    # visits that fit; DP runs always truncate, since a patient must stay one example)
    long_patients: str = "windows"
    # checkpoint selection and early stopping on validation: "fidelity" (training.fidelity: a
    # plain cohort on validation demographics, drawn with the engine, scored by bigram and
    # unigram R2 and the KS of visits per patient), or the demographics-only reconstruction's
    # "nll_per_token" / "nll_per_code"
    monitor: str = "fidelity"
    # patients in the fidelity sample: validation patients (0: all), their demographics cycled
    # up to this many where the split is smaller (8,000 halves the noise of 4,000's +-0.02)
    fidelity_patients: int = 8000
    calibrate: bool = True  # fit the stop calibration (app.decoding.calibration) at the end
    # demographics per calibration sample: validation patients, cycled up to this many
    calibration_patients: int = 8000
    # sampling temperatures the calibration tries on validation (training.calibrate
    # .fit_calibration: the first is kept unless another wins by a margin). Off by default:
    # with the stop offsets refitted at each, 1.0 won on UCI and mimic3-scale (lower
    # temperatures cost bigram R2; bench/fidelity_results.md), so trying others only costs time
    calibration_temperatures: list[float] = Field(default_factory=lambda: [1.0])
    device: str = "cpu"  # "cuda" trains on a CUDA GPU where one is present
    # Small-cell suppression (every bundle): codes carried by fewer training patients are
    # left out of the vocabulary (many data-sharing agreements use 11).
    min_patients_per_code: int = 11
    # Differential privacy (training.privacy): dp_epsilon > 0 turns DP-SGD on; the budget
    # covers the model and every statistic the bundle ships. dp_delta 0: 1 / n_train^1.1.
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    dp_max_grad_norm: float = 1.0  # per-sample clipping norm
    dp_stats_fraction: float = 0.1  # share of epsilon spent on the released statistics
    dp_max_codes_per_patient: int = 8  # contribution bound of the released code counts
    dp_max_noise_multiplier: float = 20.0  # above this the model would learn nothing useful

    @field_validator("calibration_temperatures")
    @classmethod
    def _temperatures(cls, values: list[float]) -> list[float]:
        if not values or not all(0.0 < t <= 10.0 for t in values):
            raise ValueError("calibration_temperatures: give at least one, each in (0, 10]")
        return values


class RunConfig(_Json):
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return cls(model=ModelConfig.from_dict(data.get("model", {})),
                   objective=ObjectiveConfig.from_dict(data.get("objective", {})),
                   train=TrainConfig.from_dict(data.get("train", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def override(self, dotted: dict[str, Any]) -> RunConfig:
        """A copy with ``{"model.d_model": 64, "train.epochs": 3}``-style overrides applied."""
        data = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if section not in data or name not in data[section]:
                raise ValueError(f"unknown config key {key!r}")
            data[section][name] = value
        return RunConfig.from_dict(data)


# Model sizes by name (vocabulary sizes are filled in at training time).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2,
             "ffn_dim": 128, "prompt_hidden": 64},
    "small": {"d_model": 128, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 4,
              "ffn_dim": 512, "prompt_hidden": 128},
    "base": {"d_model": 256, "encoder_layers": 3, "decoder_layers": 3, "attention_heads": 4,
             "ffn_dim": 1024, "prompt_hidden": 256},
}


def model_config_for(size: str, **overrides: Any) -> ModelConfig:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    return ModelConfig(**{**SIZES[size], **overrides})
