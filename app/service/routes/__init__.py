"""The routes, one module per resource (as in FastAPI's full-stack template).

``/v1``, each behind the API key check (:func:`app.service.dependencies.require_key`):
:mod:`~app.service.routes.patients`, :mod:`~app.service.routes.cohorts`,
:mod:`~app.service.routes.models`, :mod:`~app.service.routes.codes`. Unversioned and never
rate limited: :mod:`~app.service.routes.ops` (``/health``, ``/ready``, ``/metrics``). ``/docs``
and ``/redoc`` are served by the app itself (:func:`app.service.api.create_app`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

__all__ = ["API_VERSION", "routers", "versioned"]

API_VERSION = "v1"


def versioned() -> APIRouter:
    """A resource's ``/v1`` router. The prefix is the route's own (not added by an enclosing
    router), so the access log and metrics name the route by its full path."""
    from app.service.dependencies import require_key

    return APIRouter(prefix=f"/{API_VERSION}", dependencies=[Depends(require_key)])


def routers() -> list[APIRouter]:
    """Every router, in the order the OpenAPI document lists their routes."""
    from app.service.routes import codes, cohorts, models, ops, patients

    return [patients.router, cohorts.router, models.router, codes.router, ops.router]
