"""Response models of the REST API (pydantic v2), and the request bodies it accepts.

The request bodies are the runtime's typed requests (:mod:`app.runtime.requests`), re-exported
here so the HTTP layer has one module of schemas. Field validation is the first line of defence:
a bad request gets ``422`` whose ``detail`` names the field (``loc``/``field``) and the reason
(``msg``); limits that depend on the deployment or the bundle are checked by the generation
service (:mod:`app.runtime.generation`) and reported the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.runtime.requests import (
    MAX_SEED,
    AgeBin,
    AgeBins,
    AgeRange,
    CohortSpec,
    Demographics,
    PatientsRequest,
    Sex,
    Strategy,
    canonical_codes,
)

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
    default_temperature: float = Field(
        1.0, description="Sampling temperature of plain, cooccurrence and rerank when a request "
        "sets none: 1.0 unless the bundle's calibration chose another on its validation split")
    models: list[ModelInfo] | None = Field(None, description="Every loaded model (the "
                                           "default first).")
