"""Decoding strategies and their parameters (validated; every field documented with its default).

=================  ===========================================================================
strategy           what it does
=================  ===========================================================================
``plain``          ancestral sampling from the model under the grammar and validity mask, with
                   ``temperature``, ``top_k`` and ``top_p`` (applied only over allowed tokens)
``cooccurrence``   ``plain`` plus a logit bias on each candidate code ``c`` inside a visit:
                   ``alpha * log(1 + sum_j C[j, c])`` over the codes ``j`` already in the visit
                   (``C``: train co-occurrence counts), updated sparsely row by row
``rerank``         ``candidates`` plain samples per patient in one batch; by default keeps one
                   drawn with probability proportional to ``exp(coherence_weight x coherence)``
                   (mean normalised PMI of its within-visit code pairs, train counts): the
                   likelihood is already in the ancestral samples, so the kept patient follows
                   the model tilted toward coherence, not its mode; ``selection="argmax"`` keeps
                   the best log-likelihood (per token) plus weighted coherence (mode seeking)
``retrieve_edit``  retrieves a training patient of the same sex and nearby age, shows a
                   ``keep_fraction`` of its codes to the encoder (the rest as ``<mask>``) and
                   regenerates the patient; a privacy guard rejects and retries any result that
                   is identical to a training patient (always: it never returns one, its own
                   source included) or, where ``min_distance`` > 0, within that Jaccard distance
                   of one
=================  ===========================================================================

Defaults were chosen by measurement on UCI (the evaluation protocol, 7,332 test patients; see
bench/evaluation_results.md, "UCI, tuned strategy defaults"): every strategy's default must keep
the fidelity of ``plain``; the sweeps behind each default are in the field descriptions.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.decoding.errors import InvalidParametersError

__all__ = [
    "STRATEGIES",
    "CooccurrenceParams",
    "PlainParams",
    "RerankParams",
    "RetrieveEditParams",
    "Strategy",
    "Work",
    "parse_params",
    "work_of",
]


class PlainParams(BaseModel):
    """Sampling controls shared by every strategy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    temperature: float = Field(1.0, gt=0.0, le=10.0, description=(
        "Divides the model's logits before sampling; below 1 sharpens, above 1 flattens. "
        "When the request leaves it out, plain, cooccurrence and rerank use the bundle's "
        "default temperature (GET /v1/models shows it): 1.0 unless its calibration was "
        "asked to fit one on its validation split and another won there."))
    top_k: int = Field(0, ge=0, description=(
        "Sample only among the k most likely allowed tokens; 0 keeps all."))
    top_p: float = Field(1.0, gt=0.0, le=1.0, description=(
        "Nucleus sampling: the smallest set of allowed tokens holding this much probability; "
        "1 keeps all."))
    max_visits: int | None = Field(None, ge=1, le=1000, description=(
        "Most visits per patient; default: the engine's (from the bundle)."))
    max_codes_per_visit: int | None = Field(None, ge=1, le=1000, description=(
        "Most codes per visit; default: the engine's (from the bundle)."))
    two_stage: bool = Field(False, description=(
        "Two-stage generation: draw each patient's visit count and codes per visit from the "
        "training split's histograms first, then let the model fill the visits with those "
        "stops forced (retrieve_edit ignores it: its prompt carries the lengths). Off by "
        "default: the bundle's stop calibration matches the same histograms while keeping "
        "the model's link between what a visit holds and how long it is (the ablation is in "
        "bench/fidelity_results.md)."))


class CooccurrenceParams(PlainParams):
    alpha: float = Field(0.02, ge=0.0, le=100.0, description=(
        "Weight of the co-occurrence bias alpha * log(1 + sum of train counts with the codes "
        "already in the visit); 0 is plain sampling. Default 0.02: on UCI (7,332 test "
        "patients; plain bigram R2 0.887) bigram R2 was -3.2 at alpha 1 (70% exact copies), "
        "0.858 at 0.1, 0.882 at 0.05 and 0.888 at 0.02: the model has learnt the "
        "co-occurrences, so a strong bias double-counts them and piles mass on common "
        "pairs."))
    normalize: bool = Field(False, description=(
        "Variant: divide each count C[j, c] by code j's training visit count, so the sum is "
        "of conditional frequencies P(c | j) in [0, 1] and a frequent code in the visit does "
        "not outweigh a rare one. On UCI bigram R2 0.889 at alpha 0.1 and 0.3, 0.872 at 1: "
        "no better than plain, so off by default."))
    bias: Literal["count", "npmi"] = Field("count", description=(
        "'count': the bias above, from summed train counts; 'npmi': alpha times the mean, "
        "over the codes already in the visit, of the positive part of their normalised PMI "
        "with the candidate (in [0, alpha] whatever the codes' frequencies, so common codes "
        "do not dominate; ``normalize`` does not apply)."))
    keep_visit_length: bool = Field(True, description=(
        "Renormalise so the bias only moves probability among codes, not between adding a "
        "code and closing the visit (keeps the model's visit lengths)."))


class RerankParams(PlainParams):
    candidates: int = Field(4, ge=1, le=64, description=(
        "Samples drawn per patient (k); with selection 'sample' a larger k tilts harder "
        "toward coherence (the resampled distribution nears p(x) exp(weight x coherence))."))
    coherence_weight: float = Field(0.5, ge=0.0, le=100.0, description=(
        "Weight of the coherence score (mean normalised PMI of within-visit code pairs under "
        "train statistics, in [-1, 1]): with selection 'sample' the candidate's selection "
        "probability is proportional to exp(weight x coherence) (0: uniform, i.e. plain "
        "sampling); with 'argmax' it is added to the log-likelihood. Defaults k 4, weight "
        "0.5: on UCI (7,332 test patients; plain bigram R2 0.887) sampling gave bigram R2 "
        "0.886 at k 4 / 0.5, 0.881 at k 4 / 1, 0.873 at k 8 / 1 and 0.800 at k 8 / 3 (exact "
        "copies 37%, 39%, 40%, 46%): tilting toward coherent visits concentrates the output "
        "on common code pairs, so a mild tilt is the one that keeps fidelity."))
    selection: Literal["sample", "argmax"] = Field("sample", description=(
        "'sample' draws the kept candidate (importance resampling toward coherence; keeps "
        "the model's diversity); 'argmax' keeps the best score, which is mode seeking: on "
        "UCI it kept the most common patients (91.6% exact copies, bigram R2 -5.8)."))
    per_token: bool = Field(True, description=(
        "With selection 'argmax': score the log-likelihood per generated token (else the "
        "sum, which favours short patients)."))


class RetrieveEditParams(PlainParams):
    keep_fraction: float = Field(0.1, ge=0.0, le=1.0, description=(
        "Share of the retrieved patient's codes shown to the encoder (rounded: with 0.1 a "
        "source of 5 codes or fewer shows only its masked structure, its visit and code "
        "counts); the rest are masked and regenerated. Default 0.1: on UCI (min_distance 0) "
        "bigram R2 was 0.615 at 0.5, 0.733 at 0.25, 0.756 at 0.1 and 0.705 at 0; the more "
        "of the source is shown, the more results land on training patients and are "
        "rejected, which removes common patients from the output."))
    neighbors: int = Field(10, ge=1, le=1000, description=(
        "The source is drawn uniformly among this many same-sex training patients nearest "
        "in age."))
    min_distance: float = Field(0.0, ge=0.0, le=1.0, description=(
        "Privacy guard: a result equal, visit for visit, to any training patient (its own "
        "source included) is always rejected and retried; above 0, so is one whose code set "
        "lies within this Jaccard distance of a training patient's. Default 0 (exact copies "
        "only): on UCI 42% of real test patients equal a training patient (one visit of "
        "three common codes), so near-copies are the data, not a leak; 0.2 lowered bigram "
        "R2 by 0.03 (keep 0.25: 0.700 against 0.733) and membership-inference AUC stays "
        "about 0.50 either way. Raise it for data where near-copies identify patients."))
    max_retries: int = Field(20, ge=0, le=1000, description=(
        "Retries per patient (each with a fresh source and random stream; the last one with "
        "no codes shown) before the request fails."))


STRATEGIES: dict[str, type[PlainParams]] = {
    "plain": PlainParams,
    "cooccurrence": CooccurrenceParams,
    "rerank": RerankParams,
    "retrieve_edit": RetrieveEditParams,
}
# The names above as a type: request schemas (their OpenAPI enum) take it from here.
Strategy = Literal[tuple(STRATEGIES)]  # Literal[("a", "b")] is Literal["a", "b"]


class Work(NamedTuple):
    """What a request asks the engine for, at most: the budget the service checks."""

    rows: int  # rows decoded on the first attempt
    rows_field: str | None  # the parameter multiplying the patients, if any
    retries: int  # rows the privacy guard may decode again (retrieve_edit), at most


def work_of(strategy: str, params: PlainParams | dict[str, Any] | None, patients: int) -> Work:
    """The work budget of ``patients`` patients under ``strategy`` and ``params``.

    ``rerank`` decodes ``candidates`` rows per patient, the others one; ``retrieve_edit``
    decodes each rejected row again, up to ``max_retries`` times. Decoding cost is about
    linear in rows at the engine's batch sizes, so rows are what a deployment budgets.
    """
    parsed = parse_params(strategy, params)
    if isinstance(parsed, RerankParams):
        return Work(patients * parsed.candidates, "candidates", 0)
    if isinstance(parsed, RetrieveEditParams):
        return Work(patients, None, patients * parsed.max_retries)
    return Work(patients, None, 0)


def parse_params(strategy: str, params: PlainParams | dict[str, Any] | None) -> PlainParams:
    """Validated parameters of ``strategy``; :class:`InvalidParametersError` names bad fields."""
    if strategy not in STRATEGIES:
        raise InvalidParametersError(
            f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[strategy]
    if isinstance(params, cls):
        return params
    if isinstance(params, PlainParams):
        params = params.model_dump(exclude_unset=True)  # unset fields keep their defaults
    try:
        return cls.model_validate(params or {})
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
            for e in err.errors())
        raise InvalidParametersError(f"invalid {strategy} parameters: {problems}") from None
