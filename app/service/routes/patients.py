"""``POST /v1/patients``: up to 100 patients, synchronously.

The body is a typed request (:class:`app.runtime.requests.PatientsRequest`); the generation
service checks it once against the deployment's limits and the bundle, and decodes it off the
event loop, micro-batched with concurrent requests (:mod:`app.runtime.generation`). The request
is bounded: past ``request_timeout_s`` it gets 504, and when its client leaves its generation
stops at the next engine batch, as it does on a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from app.runtime.generation import Limits, patient_rows, request_scope
from app.service import exports
from app.service.dependencies import State
from app.service.routes import versioned
from app.service.schemas import PatientsRequest, PatientsResponse

__all__ = ["router"]

log = logging.getLogger("synthehr.api")
router = versioned()


@router.post("/patients", response_model=PatientsResponse, tags=["patients"],
             summary="Generate up to 100 patients synchronously",
             responses={422: {"description": "Invalid request: `detail` names field and reason"},
                        503: {"description": "No model loaded"},
                        504: {"description": "Ran past `request_timeout_s`; generation stopped"}})
async def post_patients(body: PatientsRequest, request: Request, state: State) -> Any:
    generation = state.ready()
    demographics = body.demographics()
    prepared = generation.prepare(body, n=len(demographics), n_field=body.count_field,
                                  limits=Limits.for_patients(state.settings))
    patients = await _bounded(request, state.settings.request_timeout_s,
                              generation.generate_async(prepared, demographics))
    state.metrics.patients.labels(body.strategy).inc(len(patients))
    gen, seed = prepared.generator, prepared.seed
    context = exports.ExportContext.for_result(
        f"patients:{seed}:{gen.bundle_version}", getattr(gen, "visit_intervals", None))
    rows = patient_rows(patients, demographics, scope=request_scope(seed, gen.bundle_version),
                        width=3)
    return JSONResponse({"bundle_version": gen.bundle_version, "strategy": body.strategy,
                         "seed": seed,
                         "patients": [exports.patient_out(row, context.dates(row))
                                      for row in rows]})


async def _bounded(request: Request, timeout_s: float, work: Any) -> Any:
    """Await ``work`` for at most ``timeout_s``, and only while the client is there. Either
    way out cancels it, which tells the inference thread to stop at its next engine batch:
    nobody's abandoned work holds a core."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if gone in done:
        log.info("client left; generation stopped", extra={"path": request.url.path})
        raise HTTPException(499, "client closed the request")
    log.warning("request timed out; generation stopped",
                extra={"path": request.url.path, "timeout_s": timeout_s})
    raise HTTPException(504, f"generation took longer than {timeout_s:g} s "
                             "(request_timeout_s) and was stopped: ask for fewer patients "
                             "or candidates")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. The body has been read by then, so the next ASGI
    message a server sends this request is ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
