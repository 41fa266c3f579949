"""Decoding strategies and their parameters (validated; every field documented with its default).

=================  ===========================================================================
strategy           what it does
=================  ===========================================================================
``plain``          ancestral sampling from the model under the grammar and validity mask, with
                   ``temperature``, ``top_k`` and ``top_p`` (applied only over allowed tokens)
``cooccurrence``   ``plain`` plus a logit bias on each candidate code ``c`` inside a visit:
                   ``alpha * log(1 + sum_j C[j, c])`` over the codes ``j`` already in the visit
                   (``C``: train co-occurrence counts), updated sparsely row by row
``rerank``         ``candidates`` plain samples per patient in one batch; keeps the one with the
                   best model log-likelihood (per token by default) plus ``coherence_weight`` x
                   coherence (mean normalised PMI of its within-visit code pairs, train counts)
``retrieve_edit``  retrieves a training patient of the same sex and nearby age, shows a
                   ``keep_fraction`` of its codes to the encoder (the rest as ``<mask>``) and
                   regenerates the patient; a privacy guard rejects and retries any result that
                   is identical to, or within Jaccard distance ``min_distance`` of, a training
                   patient
=================  ===========================================================================
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.decoding.errors import InvalidParametersError

__all__ = [
    "STRATEGIES",
    "CooccurrenceParams",
    "PlainParams",
    "RerankParams",
    "RetrieveEditParams",
    "parse_params",
]


class PlainParams(BaseModel):
    """Sampling controls shared by every strategy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, gt=0.0, le=10.0, description=(
        "Divides the model's logits before sampling; below 1 sharpens, above 1 flattens."))
    top_k: int = Field(0, ge=0, description=(
        "Sample only among the k most likely allowed tokens; 0 keeps all."))
    top_p: float = Field(1.0, gt=0.0, le=1.0, description=(
        "Nucleus sampling: the smallest set of allowed tokens holding this much probability; "
        "1 keeps all."))
    max_visits: int | None = Field(None, ge=1, le=1000, description=(
        "Most visits per patient; default: the engine's (from the bundle)."))
    max_codes_per_visit: int | None = Field(None, ge=1, le=1000, description=(
        "Most codes per visit; default: the engine's (from the bundle)."))


class CooccurrenceParams(PlainParams):
    alpha: float = Field(1.0, ge=0.0, le=100.0, description=(
        "Weight of the co-occurrence bias alpha * log(1 + sum of train counts with the codes "
        "already in the visit); 0 is plain sampling."))
    keep_visit_length: bool = Field(True, description=(
        "Renormalise so the bias only moves probability among codes, not between adding a "
        "code and closing the visit (keeps the model's visit lengths)."))


class RerankParams(PlainParams):
    candidates: int = Field(8, ge=1, le=64, description="Samples drawn per patient (k).")
    coherence_weight: float = Field(1.0, ge=0.0, le=100.0, description=(
        "Weight of the coherence score (mean normalised PMI of within-visit code pairs under "
        "train statistics, in [-1, 1]) added to the log-likelihood."))
    per_token: bool = Field(True, description=(
        "Score the log-likelihood per generated token (else the sum, which favours short "
        "patients)."))


class RetrieveEditParams(PlainParams):
    keep_fraction: float = Field(0.5, ge=0.0, le=1.0, description=(
        "Share of the retrieved patient's codes shown to the encoder; the rest are masked "
        "and regenerated."))
    neighbors: int = Field(10, ge=1, le=1000, description=(
        "The source is drawn uniformly among this many same-sex training patients nearest "
        "in age."))
    min_distance: float = Field(0.2, ge=0.0, le=1.0, description=(
        "Privacy guard: a result whose code set lies within this Jaccard distance of any "
        "training patient (or that equals one visit for visit) is rejected and retried."))
    max_retries: int = Field(20, ge=0, le=1000, description=(
        "Retries per patient (each with a fresh source and random stream; the last one with "
        "no codes shown) before the request fails."))


STRATEGIES: dict[str, type[PlainParams]] = {
    "plain": PlainParams,
    "cooccurrence": CooccurrenceParams,
    "rerank": RerankParams,
    "retrieve_edit": RetrieveEditParams,
}


def parse_params(strategy: str, params: PlainParams | dict[str, Any] | None) -> PlainParams:
    """Validated parameters of ``strategy``; :class:`InvalidParametersError` names bad fields."""
    if strategy not in STRATEGIES:
        raise InvalidParametersError(
            f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[strategy]
    if isinstance(params, cls):
        return params
    if isinstance(params, PlainParams):
        params = params.model_dump()
    try:
        return cls.model_validate(params or {})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
            for e in err.errors())
        raise InvalidParametersError(f"invalid {strategy} parameters: {problems}") from None
