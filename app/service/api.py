"""The REST API's app factory: ``create_app(settings) -> FastAPI``.

Routes (versioned under ``/v1``, one module per resource in :mod:`app.service.routes`):
synchronous patients, cohort jobs with cached results, streamed exports, the loaded models'
manifests, code lookup; plus ``/health``, ``/ready`` and ``/metrics``. ``/docs`` and ``/redoc``
serve Swagger UI and ReDoc from assets installed with the ``fastapi-offline`` package: nothing
is fetched from the internet. In front of them: :mod:`app.service.middleware` (body size, rate
limit, access log, metrics); refusals become 422s in :mod:`app.service.errors`; the routes reach
the shared state through :mod:`app.service.dependencies`.

Inference never runs on the event loop: the generation service (:mod:`app.runtime.generation`)
decodes in a bounded inference pool (``inference_threads``), micro-batching concurrent
``POST /v1/patients`` requests of equal strategy, params and validity flag into one engine call
(``batch_window_ms``, ``max_batch_patients``, ``batch_concurrency``) with byte-identical
responses; store calls run in FastAPI's thread pool, and exports are written by a synchronous
iterator that Starlette drives from a thread. Each such request is bounded: a work budget
checked before it runs (:func:`app.decoding.params.work_of`), and ``request_timeout_s`` and the
client's presence checked while it runs; either way out stops its engine work at the next
engine batch. Responses never carry a filesystem path (:mod:`app.runtime.redact`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app.athena import load_athena
from app.runtime.redact import redact_text
from app.service.errors import add_error_handlers
from app.service.middleware import GuardMiddleware, key_is_valid
from app.service.routes import API_VERSION, routers
from app.service.state import ServiceMetrics, ServiceState
from app.service.store import JobStore, make_store
from app.service.worker import Worker, start_thread
from app.settings import Settings

__all__ = ["API_VERSION", "create_app", "key_is_valid"]

log = logging.getLogger("synthehr.api")

DESCRIPTION = """
Synthetic patients - visits of ICD-9-CM diagnosis codes conditioned on age and sex - from a
model trained offline. Nothing served is a training record.

* `POST /v1/patients`: up to 100 patients at once, synchronously.
* `POST /v1/cohorts`: a cohort (up to 100,000) as a background job; poll
  `GET /v1/cohorts/{id}`, then download
  `GET /v1/cohorts/{id}/result?format=json|ndjson|csv|mimic3|omop|fhir|parquet`.
  An identical request (spec, seed, model) returns the same job or its cached result.

Invalid requests get `422` with the offending field (`loc`, `field`) and the reason (`msg`),
including requests over the deployment's work budget (patients x `candidates`, patients x
`max_retries`). A synchronous request that runs past the deployment's timeout gets `504`, and
its generation stops, as it does when the client disconnects. A client with too many
unfinished cohorts gets `429`. When the deployment sets an API key, send it in the `X-API-Key`
header.
"""


def create_app(settings: Settings | None = None, *, generator=None,
               store: JobStore | None = None,
               generator_factory: Callable[[Settings], Any] | None = None) -> FastAPI:
    """The API. ``generator``/``store`` may be injected (tests); by default the bundle at
    ``settings.bundle`` is loaded at startup and the store follows ``settings.redis_url``."""
    settings = settings or Settings()
    if store is None:
        store = make_store(settings.redis_url, settings.key_prefix)
    # A bad Athena folder stops start-up here, naming the file or column (app.athena).
    concepts = (load_athena(settings.athena_vocabulary)
                if settings.athena_vocabulary is not None else None)
    state = ServiceState(settings, store, ServiceMetrics(), concepts)
    if generator is not None:
        state.serve(generator)

    app = FastAPIOffline(
        title="synthehr", version="0.1.0", description=DESCRIPTION,
        lifespan=_lifespan(state, generator_factory),
        openapi_tags=[
            {"name": "patients", "description": "Synthetic patients, synchronously."},
            {"name": "cohorts", "description": "Large cohorts as background jobs."},
            {"name": "model", "description": "The loaded model and the code hierarchy."},
            {"name": "ops", "description": "Health, readiness and metrics."}],
        swagger_ui_parameters={"defaultModelsExpandDepth": 0})
    app.state.service = state
    app.add_middleware(GuardMiddleware, settings=settings, metrics=state.metrics)
    add_error_handlers(app)
    for router in routers():
        app.include_router(router)
    app.state.request_id = uuid.uuid4().hex
    return app


def _load(state: ServiceState, generator_factory: Callable[[Settings], Any] | None) -> None:
    """Load the configured bundle(s) unless a generator was injected; on failure the service
    stays up, not ready, with the reason (never a path of this machine) in ``/ready``."""
    if state.generation is not None:
        return
    settings = state.settings
    try:
        if generator_factory is not None:
            state.serve(generator_factory(settings))
        else:
            from app.runtime.bundles import load_configured

            state.serve(load_configured(settings))
        log.info("bundle loaded", extra={"bundle": settings.bundles or str(settings.bundle),
                                         "version": state.generator.bundle_version})
    except Exception as err:  # noqa: BLE001 - stay up, report not-ready with the reason
        log.error("bundle not loaded: the service is not ready",
                  extra={"bundle": str(settings.bundle), "error": f"{err}"})
        # Served by /ready: the bundle's folder name, never its path on this machine.
        text = f"{type(err).__name__}: {err}"
        for form in {str(settings.bundle.resolve()), str(settings.bundle)}:
            text = text.replace(form, settings.bundle.resolve().name)
        state.load_error = redact_text(text)


def _lifespan(state: ServiceState, generator_factory: Callable[[Settings], Any] | None):
    """Start-up: load the bundle, open the inference pool, start the embedded workers (no
    Redis); shutdown: stop them and close the pool."""
    settings, store = state.settings, state.store

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if store.kind == "embedded":
            log.warning("no REDIS_URL: using the EMBEDDED in-process job store and worker "
                        "(jobs live in this process only and are lost when it stops; set "
                        "REDIS_URL and run `synthehr worker` for a durable queue)",
                        extra={"store": "embedded"})
        else:
            log.info("job store: redis", extra={"store": "redis", "prefix": settings.key_prefix})
        await asyncio.get_running_loop().run_in_executor(None, _load, state, generator_factory)
        state.pool = ThreadPoolExecutor(max_workers=settings.inference_threads,
                                        thread_name_prefix="inference")
        if state.generation is not None:
            state.generation.open(state.pool)
        state.stop = threading.Event()
        state.threads = []
        if store.kind == "embedded" and state.generation is not None:
            for _ in range(settings.embedded_workers):  # the API's own generation service
                worker = Worker(store, state.generation, settings)
                state.threads.append(start_thread(worker, state.stop))
        try:
            yield
        finally:
            state.stop.set()
            for thread in state.threads:
                thread.join(timeout=10)
            state.pool.shutdown(wait=False, cancel_futures=True)
            state.pool = None
            if state.generation is not None:
                state.generation.close()

    return lifespan
