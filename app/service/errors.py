"""Every refusal as FastAPI's ``422``: ``detail`` lists the offending fields (``loc``,
``field``) with the reason (``msg``), whether pydantic, the generation service or the engine
refused the request."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.decoding.errors import (
    GenerationError,
    ImpossibleConstraintError,
    InvalidParametersError,
    PrivacyGuardError,
    StrategyUnavailableError,
    UnknownCodeError,
)

__all__ = ["InvalidField", "add_error_handlers", "invalid"]


class InvalidField(Exception):
    """A field the route itself refuses (a path parameter no model can check); a 422."""

    def __init__(self, field: str, message: str, where: str = "body") -> None:
        super().__init__(message)
        self.field, self.message, self.where = field, message, where


def invalid(field: str, message: str, where: str = "body",
            also: tuple[str, ...] = ()) -> JSONResponse:
    """A 422 in FastAPI's format, for checks outside the pydantic models; ``also`` names
    further fields the same reason applies to (a budget exceeded by their product)."""
    detail = []
    for name in (field, *also):
        loc = [where, *name.split(".")] if name else [where]
        detail.append({"loc": loc, "field": name, "msg": message, "type": "value_error"})
    return JSONResponse(status_code=422, content={"detail": detail})


def _field(loc: list | tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def _json_scalar(value: Any) -> bool:
    """True for a value JSON can carry back as it came: NaN, Infinity and 1e400 (read as
    infinity) cannot be encoded, so the 422 that rejects them must not echo them."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, bool, type(None)))


def _generation_error_field(err: GenerationError) -> str:
    if getattr(err, "field", None):  # the service's and targeting's errors name their field
        return err.field  # type: ignore[attr-defined]
    if isinstance(err, (UnknownCodeError, ImpossibleConstraintError)):
        return "must_include"
    if isinstance(err, StrategyUnavailableError):
        return "strategy"
    if isinstance(err, InvalidParametersError):
        return "params"
    if isinstance(err, PrivacyGuardError):
        return "strategy"
    return "body"


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = []
    for e in exc.errors():
        item = {"loc": list(e.get("loc", ())), "field": _field(e.get("loc", ())),
                "msg": e.get("msg", ""), "type": e.get("type", "")}
        if "input" in e and _json_scalar(e["input"]):
            item["input"] = e["input"]
        detail.append(item)
    return JSONResponse(status_code=422, content={"detail": detail})


async def _invalid_field(request: Request, exc: InvalidField) -> JSONResponse:
    return invalid(exc.field, exc.message, exc.where)


async def _generation(request: Request, exc: GenerationError) -> JSONResponse:
    return invalid(_generation_error_field(exc), str(exc), also=getattr(exc, "also", ()))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidField, _invalid_field)  # type: ignore[arg-type]
    app.add_exception_handler(GenerationError, _generation)  # type: ignore[arg-type]
