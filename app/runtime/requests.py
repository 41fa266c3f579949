"""Typed generation requests: what a caller asks the generation service for (pydantic v2).

:class:`GenerationRequest` holds what every request carries (strategy and its parameters, seed,
required codes, targeting, validity mask, model); :class:`PatientsRequest` adds the patients'
demographics (``POST /v1/patients``), :class:`CohortSpec` a cohort's size and age and sex mix
(``POST /v1/cohorts``, the cohort jobs, ``synthehr generate``). Building one checks every field
on its own: ranges, finite numbers, the strategy's parameters (parsed once; the parsed model is
:meth:`GenerationRequest.parsed_params`) and code spellings (made canonical). What depends on
the deployment or the bundle - limits, vocabulary, strategy availability, targeting
feasibility - is checked once by :meth:`app.runtime.generation.GenerationService.prepare`.

A bad field raises pydantic's ``ValidationError`` naming it; the HTTP layer reports it as a
``422`` whose ``detail`` names the field (``loc``/``field``) and the reason (``msg``). These
models are also the HTTP bodies (:mod:`app.service.schemas` re-exports them), so their JSON
schema is the API's.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from app.corpus import Sex
from app.decoding.errors import GenerationError
from app.decoding.params import STRATEGIES, PlainParams, Strategy, parse_params
from app.icd9.codes import InvalidCodeError, normalize_code
from app.icd9.hierarchy import load_hierarchy

__all__ = [
    "MAX_SEED",
    "AgeBin",
    "AgeBins",
    "AgeRange",
    "CohortSpec",
    "Demographics",
    "GenerationRequest",
    "PatientsRequest",
    "Sex",
    "Strategy",
    "canonical_codes",
    "canonical_targets",
    "cms_codes",
]

MAX_SEED = 2**63 - 1
MAX_MUST_INCLUDE = 16
MAX_TARGETS = 256  # any_of / exclude entries (each may be a whole category)


class _Strict(BaseModel):
    # NaN and infinities (JSON's NaN, Infinity, or 1e400 read as infinity) are refused with a
    # 422 naming the field: no range check could hold them, and JSON cannot echo them back.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def canonical_codes(values: list[str]) -> list[str]:
    """Canonical, de-duplicated codes; ``ValueError`` naming the first that is not ICD-9-CM."""
    hierarchy = load_hierarchy()
    out: list[str] = []
    for raw in values:
        try:
            code = hierarchy.lookup(raw).code
        except InvalidCodeError as err:
            raise ValueError(f"{raw!r} is not an ICD-9-CM diagnosis code ({err})") from None
        if code not in out:
            out.append(code)
    return out


@lru_cache(maxsize=1)
def cms_codes() -> frozenset[str]:
    """Every code of CMS ICD-9-CM v32: the billable codes and their categories and
    subcategories (every prefix of at least 3 characters, 4 for E codes)."""
    out: set[str] = set()
    for code in load_hierarchy().billable_codes:
        shortest = 4 if code.startswith("E") else 3
        out.update(code[:k] for k in range(shortest, len(code) + 1))
    return frozenset(out)


def canonical_targets(values: list[str]) -> list[str]:
    """Canonical, de-duplicated codes or categories (``250``, ``V30``, ``2500``, ``25000``);
    ``ValueError`` naming the first that is neither a CMS ICD-9-CM code nor a category."""
    out: list[str] = []
    for raw in values:
        try:
            entry = normalize_code(raw)
        except InvalidCodeError as err:
            raise ValueError(f"{raw!r} is not an ICD-9-CM code or category ({err})") from None
        if entry not in cms_codes():
            raise ValueError(f"{raw!r} is neither an ICD-9-CM diagnosis code nor a category "
                             "of one (CMS v32)")
        if entry not in out:
            out.append(entry)
    return out


class Demographics(_Strict):
    """Age in years at the first visit (0-90) and sex."""

    age: float = Field(..., ge=0.0, le=90.0, description="Age in years (capped at 90).",
                       examples=[67])
    sex: Sex = Field(..., description="`F` or `M`.", examples=["F"])


class GenerationRequest(_Strict):
    """What every generation request carries (the fields shared by patients and cohorts)."""

    strategy: Strategy = Field("plain", description="Decoding strategy.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the strategy (validated against it): "
        "every strategy takes `temperature`, `top_k`, `top_p`, `max_visits`, "
        "`max_codes_per_visit`; `cooccurrence` adds `alpha`, `bias`, `keep_visit_length`, "
        "`normalize`; "
        "`rerank` adds `candidates`, `coherence_weight`, `per_token`, `selection`; "
        "`retrieve_edit` adds "
        "`keep_fraction`, `neighbors`, `min_distance`, `max_retries`.",
        examples=[{"temperature": 1.0}, {"alpha": 0.05}])
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; the same "
                             "request, seed and bundle give the same patients. None: random.")
    must_include: list[str] = Field(default_factory=list, max_length=MAX_MUST_INCLUDE,
                                    description="Codes every patient must carry (any "
                                    "ICD-9-CM spelling: `250.00` or `25000`).",
                                    examples=[["25000"]])
    any_of: list[str] = Field(default_factory=list, max_length=MAX_TARGETS,
                              description="Each patient carries at least one code of this list; "
                              "entries are codes or categories (`250` stands for every `250.xx` "
                              "code the model knows).", examples=[["250", "V58.67"]])
    exclude: list[str] = Field(default_factory=list, max_length=MAX_TARGETS,
                               description="Codes or categories never generated.",
                               examples=[["401.9"]])
    validity_mask: bool = Field(True, description="Forbid codes inconsistent with the patient's "
                                "age and sex (CMS Medicare Code Editor edits).")
    model: str | None = Field(None, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                              description="The loaded model (bundle) to use, by name "
                                          "(`GET /v1/models`); default: the first.",
                              examples=["demo"])

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        strategy = info.data.get("strategy")
        if strategy is None:  # the strategy itself was invalid and is reported on its own
            return value
        try:
            return parse_params(strategy, value).model_dump(exclude_unset=True)
        except GenerationError as err:
            raise ValueError(str(err)) from None

    @field_validator("must_include")
    @classmethod
    def _codes(cls, value: list[str]) -> list[str]:
        return canonical_codes(value)

    @field_validator("any_of", "exclude")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        return canonical_targets(value)

    def parsed_params(self) -> PlainParams:
        """``params`` as the strategy's parameter model, built from the values validated
        with the request (not validated again): what the engine decodes with."""
        return STRATEGIES[self.strategy].model_construct(**self.params)


class PatientsRequest(GenerationRequest):
    """Patients generated synchronously: either ``patients`` (one demographics entry each) or
    ``n`` patients sharing ``age`` and ``sex``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"n": 2, "age": 67, "sex": "F", "strategy": "plain", "seed": 7},
        {"patients": [{"age": 45, "sex": "M"}, {"age": 3, "sex": "F"}],
         "strategy": "cooccurrence", "params": {"alpha": 0.05}, "seed": 1,
         "must_include": ["401.9"], "validity_mask": True},
    ]})

    n: int | None = Field(None, ge=1, le=10_000, description="Number of patients with the "
                          "shared `age` and `sex` (default 1).")
    age: float | None = Field(None, ge=0.0, le=90.0, description="Shared age in years.")
    sex: Sex | None = Field(None, description="Shared sex.")
    patients: list[Demographics] | None = Field(None, min_length=1, max_length=10_000,
                                                description="Per-patient demographics.")

    @model_validator(mode="after")
    def _one_form(self) -> PatientsRequest:
        if self.patients is not None:
            if self.age is not None or self.sex is not None:
                raise ValueError("give either `patients` or the shared `age` and `sex`, not both")
            if self.n is not None and self.n != len(self.patients):
                raise ValueError(f"`n` ({self.n}) differs from len(patients) "
                                 f"({len(self.patients)})")
        elif self.age is None or self.sex is None:
            raise ValueError("give `patients` (a list of {age, sex}) or both shared `age` and "
                             "`sex`")
        return self

    def demographics(self) -> list[tuple[float, str]]:
        if self.patients is not None:
            return [(p.age, p.sex) for p in self.patients]
        return [(float(self.age), str(self.sex))] * (self.n or 1)

    @property
    def count_field(self) -> str:
        """The field that sets how many patients: ``patients`` or ``n``."""
        return "patients" if self.patients is not None else "n"


class AgeRange(_Strict):
    """Ages drawn uniformly from ``[min, max]``."""

    min: float = Field(..., ge=0.0, le=90.0)
    max: float = Field(..., ge=0.0, le=90.0)

    @model_validator(mode="after")
    def _ordered(self) -> AgeRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) exceeds max ({self.max})")
        return self


class AgeBin(AgeRange):
    weight: float = Field(..., gt=0.0, le=1e9, description="Relative weight of the bin.")


class AgeBins(_Strict):
    """A bin is drawn by weight, then an age uniformly inside it."""

    bins: list[AgeBin] = Field(..., min_length=1, max_length=100)


class CohortSpec(GenerationRequest):
    """A cohort generated by a background job."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"size": 1000, "age": {"min": 40, "max": 80}, "female_fraction": 0.55,
         "strategy": "plain", "seed": 42},
        {"size": 500, "age": {"bins": [{"min": 0, "max": 17, "weight": 1},
                                       {"min": 65, "max": 90, "weight": 3}]},
         "female_fraction": 0.5, "strategy": "cooccurrence", "params": {"alpha": 0.05},
         "seed": 3},
        {"size": 100, "age": {"min": 40, "max": 80}, "any_of": ["250"],
         "exclude": ["401.9"], "seed": 7},
    ]})

    size: int = Field(..., ge=1, description="Patients in the cohort (at most the deployment's "
                      "limit, 100,000 by default).", examples=[1000])
    age: float | AgeRange | AgeBins = Field(
        default_factory=lambda: AgeRange(min=0, max=90),
        description="A fixed age, a range `{min, max}` or weighted bins `{bins: [...]}`.")
    female_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of female patients.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Random seed (part of the cache key).")

    @field_validator("age")
    @classmethod
    def _age(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not 0.0 <= float(value) <= 90.0:
            raise ValueError("a fixed age must lie in [0, 90]")
        return value
