"""``/v1/cohorts``: submit a cohort job, follow it, cancel it, download it, compare it.

A submission is checked once by the generation service (limits, bundle, and whether its
targeting can be met for every age and sex the cohort may draw), then becomes a job
(:mod:`app.service.jobs`) in the job store, run chunk by chunk by the workers. An identical
spec, seed and model finds the same job or its cached result.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from app.runtime.bundles import GeneratorSet
from app.runtime.generation import Limits
from app.runtime.redact import redact_text
from app.service import cohort_report, exports
from app.service.dependencies import State
from app.service.jobs import (
    iter_result,
    job_id_for,
    new_record,
    possible_demographics,
    result_available,
    results_folder,
)
from app.service.middleware import client_key
from app.service.routes import API_VERSION, versioned
from app.service.schemas import CohortSpec, CohortStatus, Progress
from app.service.state import ServiceState
from app.service.store import TooManyJobs

__all__ = ["router", "status_of"]

log = logging.getLogger("synthehr.api")
router = versioned()
JOB_ID = r"^[0-9a-f]{32}$"
JobId = Annotated[str, Path(pattern=JOB_ID, description="Job id (32 hex digits).",
                            examples=["0f3c2a9b8d7e6f5a4b3c2d1e0f9a8b7c"])]


def _f(value: str | None) -> float | None:
    return float(value) if value else None


def status_of(record: dict[str, str], cached: bool = False,
              result_urls: dict[str, str] | None = None,
              warning: str | None = None) -> CohortStatus:
    """A job's record (:func:`app.service.jobs.new_record`) as the API reports it."""
    started, finished = _f(record.get("started_at")), _f(record.get("finished_at"))
    elapsed = None
    if started is not None:
        elapsed = round((finished if finished is not None else time.time()) - started, 3)
    return CohortStatus(
        id=record["id"], status=record["status"],  # type: ignore[arg-type]
        progress=Progress(done=int(record.get("done") or 0), total=int(record["total"])),
        bundle_version=record.get("bundle_version", ""),
        created_at=_f(record.get("created_at")), started_at=started, finished_at=finished,
        elapsed_s=elapsed, attempts=int(record.get("attempts") or 0),
        error=record.get("error") or None, cached=cached,
        result=result_urls if record["status"] == "done" else None,
        warning=warning if record["status"] in ("queued", "running") else None)


def _result_urls(job_id: str) -> dict[str, str]:
    return {f: f"/{API_VERSION}/cohorts/{job_id}/result?format={f}" for f in exports.FORMATS}


def _record(state: ServiceState, job_id: str) -> dict[str, str]:
    """The job's record; 503 when the store is unreachable, 404 when it has no such job."""
    store = state.store
    try:
        record = store.get(job_id)
    except store.connection_errors as err:
        raise HTTPException(503, f"job store unreachable: {redact_text(str(err))}") from None
    if record is None:
        raise HTTPException(404, f"no job {job_id}: never submitted, expired after the "
                                 "cache TTL, or lost by a store restarted without "
                                 "persistence (submit it again)")
    return record


@router.post("/cohorts", status_code=202, response_model=CohortStatus, tags=["cohorts"],
             summary="Submit a cohort job (or find the identical one already submitted)",
             responses={202: {"description": "Accepted; `Location` is the job's URL",
                              "headers": {"Location": {"schema": {"type": "string"}}}},
                        422: {"description": "Invalid spec: `detail` names field and reason"},
                        429: {"description": "Too many unfinished cohorts of this client"},
                        503: {"description": "No model loaded, or the store is unreachable"}})
def post_cohort(spec: CohortSpec, response: Response, request: Request, state: State) -> Any:
    settings, store = state.settings, state.store
    generation = state.ready()
    prepared = generation.prepare(spec, n=spec.size, n_field="size",
                                  limits=Limits.for_cohorts(settings),
                                  domain=possible_demographics(spec))
    if isinstance(generation.generator, GeneratorSet):  # the default by name: one cache key
        spec = spec.model_copy(update={"model": prepared.model})
    job_id = job_id_for(spec, prepared.bundle_version)
    record = new_record(job_id, spec, prepared.bundle_version, settings.chunk_size, time.time(),
                        settings.generation_batch,
                        results_folder(job_id, spec.size, settings.results_url,
                                       settings.result_inline_max_patients))
    client = client_key(dict(request.scope.get("headers") or []),
                        request.scope.get("client"), settings.api_key)
    try:
        record, created = store.submit(job_id, record, client=client,
                                       max_active=settings.max_active_cohorts_per_client)
    except TooManyJobs as err:
        state.metrics.jobs.labels("refused").inc()
        return JSONResponse(status_code=429, headers={"Retry-After": "30"}, content={
            "detail": f"this client already has {err.active} unfinished cohort jobs (at "
                      f"most {settings.max_active_cohorts_per_client}): wait for one to "
                      "finish or cancel one"})
    except store.connection_errors as err:
        return JSONResponse(status_code=503, content={
            "detail": f"job store unreachable: {redact_text(str(err))}"})
    state.metrics.jobs.labels("created" if created else "cached").inc()
    response.headers["Location"] = f"/{API_VERSION}/cohorts/{job_id}"
    log.info("cohort submitted", extra={"job": job_id, "size": spec.size, "new_job": created})
    return status_of(record, cached=not created, result_urls=_result_urls(job_id),
                     warning=state.worker_warning())


@router.get("/cohorts/{job_id}", response_model=CohortStatus, tags=["cohorts"],
            summary="Status, progress, timings and error of a cohort job",
            responses={404: {"description": "Unknown job"}})
def get_cohort(job_id: JobId, state: State) -> Any:
    record = _record(state, job_id)
    warning = state.worker_warning() if record["status"] in ("queued", "running") else None
    return status_of(record, result_urls=_result_urls(job_id), warning=warning)


@router.delete("/cohorts/{job_id}", response_model=CohortStatus, tags=["cohorts"],
               summary="Cancel a cohort job",
               responses={404: {"description": "Unknown job"},
                          409: {"description": "The job already finished"}})
def delete_cohort(job_id: JobId, state: State) -> Any:
    record = _record(state, job_id)
    if not state.store.cancel(job_id, time.time(), state.settings.cache_ttl_s):
        return JSONResponse(status_code=409, content={
            "detail": f"job {job_id} is already {record['status']}"})
    return status_of(_record(state, job_id))


@router.get("/cohorts/{job_id}/result", tags=["cohorts"],
            summary="Download a finished cohort (streamed)",
            response_class=StreamingResponse,
            responses={200: {"description": "The cohort", "content": exports.openapi_content()},
                       404: {"description": "Unknown job"},
                       409: {"description": "The job is not done"},
                       410: {"description": "The result expired from the store"}})
def get_result(job_id: JobId, state: State,
               format: Annotated[exports.Format, Query(
                   description=exports.format_description())] = "json") -> Any:
    record = _record(state, job_id)
    if record["status"] != "done":
        return JSONResponse(status_code=409, content={
            "detail": f"job {job_id} is {record['status']}, not done",
            "status": status_of(record).model_dump()})
    # Every chunk must be there before the first byte goes out (a 200 cannot be taken back
    # mid-stream), and stay for the download: retain extends their expiry if it is close.
    if not result_available(state.store, record, state.settings.result_grace_s):
        return JSONResponse(status_code=410, content={
            "detail": f"the result of job {job_id} has expired or was lost by the store; "
                      "submit the cohort again to regenerate it"})
    meta = {"id": job_id, "bundle_version": record.get("bundle_version", ""),
            "count": int(record["total"])}
    gen = state.generator
    if isinstance(gen, GeneratorSet):
        gen = gen.by_version(record.get("bundle_version", "")) or gen
    context = exports.ExportContext.for_result(
        job_id, getattr(gen, "visit_intervals", None), state.concepts)
    body = exports.stream(format, lambda: iter_result(state.store, record), meta, context)
    name = f"cohort-{job_id[:12]}.{exports.EXTENSIONS[format]}"
    return StreamingResponse(body, media_type=exports.MEDIA_TYPES[format], headers={
        "Content-Disposition": f'attachment; filename="{name}"',
        "ETag": f'"{job_id}-{format}"'})


@router.get("/cohorts/{job_id}/report", tags=["cohorts"],
            summary="A finished cohort compared with the training split's aggregates",
            response_class=HTMLResponse,
            responses={200: {"description": "HTML page (inline SVG charts), or JSON with "
                                            "`Accept: application/json`",
                             "content": {"text/html": {}, "application/json": {}}},
                       404: {"description": "Unknown job"},
                       409: {"description": "The job is not done"},
                       503: {"description": "No model, or no training-split statistics"}})
def get_report(job_id: JobId, request: Request, state: State) -> Any:
    record = _record(state, job_id)
    if record["status"] != "done":
        return JSONResponse(status_code=409, content={
            "detail": f"job {job_id} is {record['status']}, not done"})
    return cohort_report.respond(job_id, record, state.ready().generator,
                                 iter_result(state.store, record),
                                 request.headers.get("accept", ""))
