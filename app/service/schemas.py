"""Request and response models of the REST API (pydantic v2), with OpenAPI examples.

Field validation is the first line of defence: a bad request gets ``422`` whose ``detail`` names
the field (``loc``/``field``) and the reason (``msg``). Limits that depend on the deployment
(:class:`app.settings.Settings`) are checked by the routes and reported the same way.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from app.corpus import Sex
from app.decoding.errors import GenerationError
from app.decoding.params import Strategy, parse_params
from app.icd9.codes import InvalidCodeError, normalize_code
from app.icd9.hierarchy import load_hierarchy

__all__ = [
    "MAX_SEED",
    "AgeBin",
    "AgeBins",
    "AgeRange",
    "CodeDetail",
    "CodeOut",
    "CohortSpec",
    "CohortStatus",
    "Demographics",
    "ModelInfo",
    "PatientOut",
    "PatientsRequest",
    "PatientsResponse",
    "Progress",
    "Sex",
    "Strategy",
    "VisitOut",
    "canonical_codes",
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
def _known_prefixes() -> frozenset[str]:
    """Every prefix (3 characters or more; 4 for E-codes) of a CMS ICD-9-CM code."""
    out = set()
    for code in load_hierarchy().billable_codes:
        start = 4 if code.startswith("E") else 3
        out.update(code[:k] for k in range(start, len(code) + 1))
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
        if entry not in _known_prefixes():
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


class _Generation(_Strict):
    strategy: Strategy = Field("plain", description="Decoding strategy.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the strategy (validated against it): "
        "every strategy takes `temperature`, `top_k`, `top_p`, `max_visits`, "
        "`max_codes_per_visit`; `cooccurrence` adds `alpha`, `keep_visit_length`, `normalize`; "
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


class PatientsRequest(_Generation):
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


class CodeOut(BaseModel):
    code: str = Field(..., examples=["4019"])
    category: str = Field(..., examples=["401"])
    chapter: str = Field(..., description="Chapter range.", examples=["390-459"])
    chapter_title: str = Field(..., examples=["Diseases of the circulatory system"])
    description: str | None = Field(..., examples=["Unspecified essential hypertension"])


class VisitOut(BaseModel):
    start: str | None = Field(None, description="Synthetic admission time (app.dating).",
                              examples=["2168-05-01 10:12:00"])
    end: str | None = Field(None, description="Synthetic discharge time, at or after `start`.",
                            examples=["2168-05-06 08:00:00"])
    codes: list[CodeOut]


class PatientOut(BaseModel):
    patient_id: str = Field(..., description="Synthetic id (never a training record's).")
    age: float
    sex: Sex
    birth_date: str | None = Field(None, description="Synthetic birth date consistent with "
                                   "`age` at the first visit.", examples=["2101-03-02"])
    visits: list[VisitOut]


class PatientsResponse(BaseModel):
    bundle_version: str
    strategy: Strategy
    seed: int
    patients: list[PatientOut]


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


class CohortSpec(_Generation):
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


class Progress(BaseModel):
    done: int
    total: int


class CohortStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: Progress
    bundle_version: str
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    elapsed_s: float | None = Field(None, description="Seconds from start to finish (or now).")
    attempts: int = Field(0, description="1 once a worker started the job, plus 1 for every "
                                         "chunk taken over from a worker whose lease expired.")
    error: str | None = None
    cached: bool = Field(False, description="True when an earlier identical request's job "
                         "(or cached result) answered this one.")
    result: dict[str, str] | None = Field(None, description="Result URLs by format, once done.")
    warning: str | None = Field(None, description="Set while the job is unfinished and no "
                                "worker has been seen for `lease_s` seconds (15 by default): "
                                "it waits until a worker starts.")


class CodeDetail(BaseModel):
    code: str
    category: str
    chapter: str
    chapter_title: str
    billable: bool
    description: str | None
    category_description: str | None
    in_model_vocabulary: bool | None = None


class ModelInfo(BaseModel):
    """The default model at the top level; every loaded model in ``models``."""

    name: str | None = Field(None, description="The name requests give as `model`.")
    default: bool = True
    bundle_version: str
    strategies: list[str]
    manifest: dict[str, Any]
    evaluation: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = Field(
        None, description="Small-cell suppression (k, codes removed) and, for a bundle trained "
        "with differential privacy, epsilon, delta, accountant, clipping norm, noise multiplier")
    unavailable_strategies: dict[str, str] = Field(
        default_factory=dict, description="Strategies this bundle cannot serve, with the reason")
    models: list[ModelInfo] | None = Field(None, description="Every loaded model (the "
                                           "default first).")
