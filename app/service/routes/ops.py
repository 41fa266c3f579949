"""Operations, unversioned and outside the rate limit: ``/health`` (liveness), ``/ready``
(bundle loaded and store reachable; the cohort side reported beside it) and ``/metrics``
(Prometheus)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.service.dependencies import State

__all__ = ["router"]

router = APIRouter()


@router.get("/health", tags=["ops"], summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", tags=["ops"], summary="Readiness: bundle loaded and store reachable",
            responses={503: {"description": "Not ready; the body says why"}})
def ready(state: State) -> Any:
    store = state.store
    store_ok = store.ping()
    workers = None
    if store_ok:
        try:
            workers = store.live_workers(time.time(), state.settings.lease_s)
        except store.connection_errors:
            workers = None
    loaded = state.generator
    body = {"ready": loaded is not None and store_ok,
            "bundle_loaded": loaded is not None,
            "bundle_version": getattr(loaded, "bundle_version", None),
            "bundle_error": state.load_error, "store": store.kind,
            "store_reachable": store_ok,
            # Cohort jobs need a worker; synchronous patients do not, so readiness (the
            # status code) stays about this process and the cohort side is reported here.
            "workers_alive": workers, "cohorts_ready": bool(workers),
            "cohorts_warning": None if workers else state.worker_warning()}
    state.metrics.ready.set(1 if body["ready"] else 0)
    return JSONResponse(status_code=200 if body["ready"] else 503, content=body)


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics",
            response_class=PlainTextResponse)
def prometheus(state: State) -> Response:
    try:
        state.metrics.queue.set(state.store.queue_length())
    except Exception:  # noqa: BLE001, S110 - metrics must answer when the store is down
        pass
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
