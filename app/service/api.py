"""The REST API: ``create_app(settings) -> FastAPI``.

Routes (versioned under ``/v1``): synchronous patients, cohort jobs with cached results,
streamed exports, the loaded model's manifest, code lookup; plus ``/health``, ``/ready`` and
``/metrics``. ``/docs`` and ``/redoc`` serve Swagger UI and ReDoc from assets installed with
the ``fastapi-offline`` package: nothing is fetched from the internet.

Inference never runs on the event loop: synchronous generation goes to a bounded thread pool
(``inference_threads``), store calls run in FastAPI's thread pool, and exports are written by a
synchronous iterator that Starlette drives from a thread. Concurrent ``POST /v1/patients``
requests of equal strategy, params and validity flag are micro-batched into one engine call
(:mod:`app.service.batcher`; ``batch_window_ms``, ``max_batch_patients``,
``batch_concurrency``) with byte-identical responses. Each such request is bounded: a work
budget checked before it runs (:func:`app.decoding.params.work_of`), and ``request_timeout_s``
and the client's presence checked while it runs; either way out stops its engine work at the
next engine batch. Responses never carry a filesystem path (:mod:`app.service.redact`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import APIKeyHeader
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from app.athena import load_athena
from app.decoding.errors import (
    GenerationError,
    ImpossibleConstraintError,
    InvalidParametersError,
    PrivacyGuardError,
    StrategyUnavailableError,
    UnknownCodeError,
)
from app.decoding.params import work_of
from app.icd9.codes import InvalidCodeError
from app.icd9.hierarchy import load_hierarchy
from app.service import cohort_report, exports
from app.service.batcher import MicroBatcher
from app.service.jobs import (
    iter_result,
    job_id_for,
    new_record,
    possible_demographics,
    result_available,
    results_folder,
    status_of,
)
from app.service.models import GeneratorSet, UnknownModelError, model_name
from app.service.redact import redact_text
from app.service.schemas import (
    CodeDetail,
    CohortSpec,
    CohortStatus,
    ModelInfo,
    PatientsRequest,
    PatientsResponse,
)
from app.service.store import JobStore, TooManyJobs, make_store
from app.service.worker import Worker, start_thread
from app.settings import Settings

__all__ = ["API_VERSION", "create_app"]

log = logging.getLogger("synthehr.api")
API_VERSION = "v1"
JOB_ID = r"^[0-9a-f]{32}$"
JobId = Annotated[str, Path(pattern=JOB_ID, description="Job id (32 hex digits).",
                            examples=["0f3c2a9b8d7e6f5a4b3c2d1e0f9a8b7c"])]
KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                          description="Required when the deployment sets an API key.")

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


# -- errors -----------------------------------------------------------------------------------

def _field(loc: list | tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def invalid(field: str, message: str, where: str = "body",
            also: tuple[str, ...] = ()) -> JSONResponse:
    """A 422 in FastAPI's format, for checks outside the pydantic models; ``also`` names
    further fields the same reason applies to (a budget exceeded by their product)."""
    detail = []
    for name in (field, *also):
        loc = [where, *name.split(".")] if name else [where]
        detail.append({"loc": loc, "field": name, "msg": message, "type": "value_error"})
    return JSONResponse(status_code=422, content={"detail": detail})


def _json_scalar(value: Any) -> bool:
    """True for a value JSON can carry back as it came: NaN, Infinity and 1e400 (read as
    infinity) cannot be encoded, so the 422 that rejects them must not echo them."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, bool, type(None)))


class _Invalid(Exception):
    def __init__(self, field: str, message: str, where: str = "body",
                 also: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field, self.message, self.where, self.also = field, message, where, also


def _generation_error_field(err: GenerationError) -> str:
    if getattr(err, "field", None):  # targeting errors name their field
        return err.field
    if isinstance(err, (UnknownCodeError, ImpossibleConstraintError)):
        return "must_include"
    if isinstance(err, StrategyUnavailableError):
        return "strategy"
    if isinstance(err, InvalidParametersError):
        return "params"
    if isinstance(err, PrivacyGuardError):
        return "strategy"
    return "body"


# -- rate limit, body size and metrics as one pure ASGI middleware -------------------------------

def key_is_valid(key: str | bytes | None, expected: str) -> bool:
    """Constant-time check of an ``X-API-Key`` value, compared as bytes: a header may carry
    any byte (Starlette hands it over as Latin-1 text, which encodes back to the raw bytes),
    and ``compare_digest`` refuses non-ASCII ``str``, which used to turn such a key into a
    500 instead of a 401. The deployment's key is compared as UTF-8."""
    if not key:
        return False
    if isinstance(key, str):
        try:
            key = key.encode("latin-1")
        except UnicodeEncodeError:
            key = key.encode("utf-8")
    return secrets.compare_digest(key, expected.encode("utf-8"))


def client_key(headers: dict[bytes, bytes], client: tuple | None, api_key: str | None) -> str:
    """The rate limiter's bucket for a request: the API key's hash when it is the valid key,
    else the client's address. An invalid key never gets a bucket of its own, so rotating
    the header does not escape the limit."""
    given = headers.get(b"x-api-key")
    if api_key and given and key_is_valid(given, api_key):
        return "key:" + hashlib.sha256(given).hexdigest()[:16]
    return "addr:" + str((client or ("?",))[0])


class _Buckets:
    """Token buckets per client: ``rate`` per minute, ``burst`` at once."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                if len(self._state) > 100_000:
                    self._state.clear()
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate if self.rate > 0 else 60.0


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("synthehr_http_requests_total", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("synthehr_http_request_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(.002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.patients = Counter("synthehr_patients_generated_total",
                                "Patients generated by the API process", ["strategy"],
                                registry=self.registry)
        self.jobs = Counter("synthehr_cohort_jobs_total", "Cohort submissions",
                            ["outcome"], registry=self.registry)
        self.queue = Gauge("synthehr_queue_length", "Unfinished cohort jobs (queued or running)",
                           registry=self.registry)
        self.ready = Gauge("synthehr_ready", "1 when the bundle is loaded and the store is up",
                           registry=self.registry)
        self.batch = Histogram("synthehr_patients_batch_size",
                               "Patients per engine call of POST /v1/patients (micro-batches)",
                               registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))


class GuardMiddleware:
    """Request body limit (413), rate limit (429), access log line and request metrics."""

    def __init__(self, app, settings: Settings, metrics: _Metrics) -> None:
        self.app = app
        self.max_bytes = settings.max_request_bytes
        self.buckets = (_Buckets(settings.rate_limit_per_minute, settings.rate_limit_burst)
                        if settings.rate_limit_per_minute > 0 else None)
        self.metrics = metrics
        self.api_key = settings.api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        status_holder = {"status": 500}
        limited = path.startswith("/v1/")

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        headers = dict(scope.get("headers") or [])
        if limited and self.buckets is not None:
            wait = self.buckets.take(client_key(headers, scope.get("client"), self.api_key))
            if wait > 0:
                await _plain(send_wrapper, 429, "rate limit exceeded; retry later",
                             [(b"retry-after", str(max(1, round(wait))).encode())])
                self._observe(scope, started, status_holder["status"])
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _plain(send_wrapper, 413, f"request body over {self.max_bytes} bytes")
            self._observe(scope, started, status_holder["status"])
            return
        received = 0
        max_bytes = self.max_bytes

        async def receive_wrapper():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except _TooLarge:
            await _plain(send_wrapper, 413, f"request body over {self.max_bytes} bytes")
        finally:
            self._observe(scope, started, status_holder["status"])

    def _observe(self, scope, started: float, status: int) -> None:
        route = scope.get("route")
        name = getattr(route, "path", None) or ("/static" if scope["path"].startswith(
            "/static-offline-docs") else "unmatched")
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(scope["method"], name, str(status)).inc()
        self.metrics.latency.labels(scope["method"], name).observe(seconds)
        level = (logging.ERROR if status >= 500 and status != 503 else
                 logging.WARNING if status == 503 else logging.DEBUG)
        if log.isEnabledFor(level):
            log.log(level, "request",
                    extra={"method": scope["method"], "path": scope["path"], "status": status,
                           "ms": round(seconds * 1000, 2)})


class _TooLarge(Exception):
    pass


async def _plain(send, status: int, message: str, extra: list | None = None) -> None:
    body = ('{"detail":"' + message + '"}').encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


@lru_cache(maxsize=1)
def cms_codes() -> frozenset[str]:
    """Every code of CMS ICD-9-CM v32: the billable codes and their categories and
    subcategories (every prefix of at least 3 characters, 4 for E codes)."""
    out: set[str] = set()
    for code in load_hierarchy().billable_codes:
        shortest = 4 if code.startswith("E") else 3
        out.update(code[:k] for k in range(shortest, len(code) + 1))
    return frozenset(out)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. The body has been read by then, so the next ASGI
    message a server sends this request is ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- the application --------------------------------------------------------------------------

class ServiceState:
    """What the routes share: settings, store, generator (None until loaded), pools."""

    def __init__(self, settings: Settings, store: JobStore, generator=None) -> None:
        self.settings = settings
        self.store = store
        self.generator = generator
        self.load_error: str | None = None
        self.pool: ThreadPoolExecutor | None = None  # per lifespan (startup -> shutdown)
        self.batcher: MicroBatcher | None = None  # per (generator, pool)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []


def create_app(settings: Settings | None = None, *, generator=None,
               store: JobStore | None = None,
               generator_factory: Callable[[Settings], Any] | None = None) -> FastAPI:
    """The API. ``generator``/``store`` may be injected (tests); by default the bundle at
    ``settings.bundle`` is loaded at startup and the store follows ``settings.redis_url``."""
    settings = settings or Settings()
    if store is None:
        store = make_store(settings.redis_url, settings.key_prefix)
    state = ServiceState(settings, store, generator)
    # A bad Athena folder stops start-up here, naming the file or column (app.athena).
    concepts = (load_athena(settings.athena_vocabulary)
                if settings.athena_vocabulary is not None else None)
    metrics = _Metrics()

    def load() -> None:
        if state.generator is not None:
            return
        try:
            if generator_factory is not None:
                state.generator = generator_factory(settings)
            else:
                from app.service.models import load_configured

                state.generator = load_configured(settings)
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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if store.kind == "embedded":
            log.warning("no REDIS_URL: using the EMBEDDED in-process job store and worker "
                        "(jobs live in this process only and are lost when it stops; set "
                        "REDIS_URL and run `synthehr worker` for a durable queue)",
                        extra={"store": "embedded"})
        else:
            log.info("job store: redis", extra={"store": "redis", "prefix": settings.key_prefix})
        await asyncio.get_running_loop().run_in_executor(None, load)
        state.pool = ThreadPoolExecutor(max_workers=settings.inference_threads,
                                        thread_name_prefix="inference")
        state.batcher = None
        state.stop = threading.Event()
        state.threads = []
        if store.kind == "embedded" and state.generator is not None:
            for _ in range(settings.embedded_workers):
                worker = Worker(store, state.generator, settings)
                state.threads.append(start_thread(worker, state.stop))
        try:
            yield
        finally:
            state.stop.set()
            for thread in state.threads:
                thread.join(timeout=10)
            state.pool.shutdown(wait=False, cancel_futures=True)
            state.pool = None
            state.batcher = None

    app = FastAPIOffline(
        title="synthehr", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
        openapi_tags=[
            {"name": "patients", "description": "Synthetic patients, synchronously."},
            {"name": "cohorts", "description": "Large cohorts as background jobs."},
            {"name": "model", "description": "The loaded model and the code hierarchy."},
            {"name": "ops", "description": "Health, readiness and metrics."}],
        swagger_ui_parameters={"defaultModelsExpandDepth": 0})
    app.state.service = state
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = []
        for e in exc.errors():
            item = {"loc": list(e.get("loc", ())), "field": _field(e.get("loc", ())),
                    "msg": e.get("msg", ""), "type": e.get("type", "")}
            if "input" in e and _json_scalar(e["input"]):
                item["input"] = e["input"]
            detail.append(item)
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(_Invalid)
    async def _invalid(request: Request, exc: _Invalid) -> JSONResponse:
        return invalid(exc.field, exc.message, exc.where, exc.also)

    @app.exception_handler(GenerationError)
    async def _generation(request: Request, exc: GenerationError) -> JSONResponse:
        return invalid(_generation_error_field(exc), str(exc))

    # -- auth ---------------------------------------------------------------------------------
    async def require_key(key: Annotated[str | None, Depends(KEY_HEADER)]) -> None:
        # async: a sync dependency would cost every /v1 request a thread-pool round trip
        if settings.api_key and not key_is_valid(key, settings.api_key):
            from fastapi import HTTPException

            raise HTTPException(401, "missing or wrong X-API-Key",
                                headers={"WWW-Authenticate": "APIKey"})

    def ready_generator():
        if state.generator is None:
            from fastapi import HTTPException

            raise HTTPException(503, f"no model loaded: {state.load_error or 'loading'}")
        return state.generator

    v1 = APIRouter(prefix=f"/{API_VERSION}", dependencies=[Depends(require_key)])

    def check_limits(strategy: str, params: dict[str, Any], n: int, n_field: str, limit: int,
                     max_rows: int, max_retries: int) -> None:
        if n > limit:
            raise _Invalid(n_field, f"at most {limit} patients per request here, got {n}")
        retries = params.get("max_retries")
        if retries is not None and retries > settings.max_retries:
            raise _Invalid("params.max_retries", f"at most {settings.max_retries}, got {retries}")
        # The work budget: what the engine may be asked to decode (app.decoding.params.work_of).
        work = work_of(strategy, params, n)
        if work.rows > max_rows:
            factor = f"params.{work.rows_field}"
            raise _Invalid(n_field, f"this request decodes {work.rows} rows ({n_field} x "
                           f"{factor}); the budget here is {max_rows}: ask for fewer patients "
                           "or candidates", also=(factor,))
        if work.retries > max_retries:
            raise _Invalid(n_field, f"this request allows {work.retries} retries ({n_field} x "
                           f"params.max_retries); the budget here is {max_retries}: ask for "
                           "fewer patients or retries", also=("params.max_retries",))
        mv = params.get("max_visits")
        if mv is not None and mv > settings.max_visits:
            raise _Invalid("params.max_visits", f"at most {settings.max_visits}, got {mv}")
        mc = params.get("max_codes_per_visit")
        if mc is not None and mc > settings.max_codes_per_visit:
            raise _Invalid("params.max_codes_per_visit",
                           f"at most {settings.max_codes_per_visit}, got {mc}")

    def batcher_for(gen) -> MicroBatcher:
        batcher = state.batcher
        if batcher is None or batcher.generator is not gen or batcher.executor is not state.pool:
            batcher = state.batcher = MicroBatcher(
                gen, state.pool,  # None (no lifespan ran): the loop's default executor
                settings.batch_window_ms / 1000.0, settings.max_batch_patients,
                min(settings.batch_concurrency, settings.inference_threads),
                on_batch=lambda requests, patients: metrics.batch.observe(patients))
        return batcher

    def model_generator(model: str | None):
        """The generator a request's ``model`` names (422 for an unknown one)."""
        gen = ready_generator()
        if isinstance(gen, GeneratorSet):
            try:
                return gen.for_model(model)
            except UnknownModelError as err:
                raise _Invalid("model", str(err)) from None
        if model is not None and model != model_name(gen):
            raise _Invalid("model", f"unknown model {model!r}; loaded: "
                                    f"{model_name(gen) or 'one unnamed bundle'}")
        return gen

    async def bounded(request: Request, work: Any) -> Any:
        """Await ``work`` for at most ``request_timeout_s``, and only while the client is
        there. Either way out cancels it, which tells the inference thread to stop at its next
        engine batch (:mod:`app.service.batcher`): nobody's abandoned work holds a core."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=settings.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        from fastapi import HTTPException

        if gone in done:
            log.info("client left; generation stopped", extra={"path": request.url.path})
            raise HTTPException(499, "client closed the request")
        log.warning("request timed out; generation stopped",
                    extra={"path": request.url.path, "timeout_s": settings.request_timeout_s})
        raise HTTPException(504, f"generation took longer than {settings.request_timeout_s:g} s "
                                 "(request_timeout_s) and was stopped: ask for fewer patients "
                                 "or candidates")

    def check_strategy(gen, strategy: str) -> None:
        """422 on ``strategy`` where the bundle cannot serve it (e.g. a DP bundle)."""
        reason = (getattr(gen, "unavailable", None) or {}).get(strategy)
        if reason:
            raise _Invalid("strategy", f"strategy {strategy!r} is not available: {reason}")

    def check_codes(gen, codes: list[str]) -> None:
        for i, code in enumerate(codes):
            if not gen.has_code(code):
                raise _Invalid(f"must_include.{i}", f"code {code} is not in the model's "
                               "vocabulary (it never occurred in its training data)")

    @v1.post("/patients", response_model=PatientsResponse, tags=["patients"],
             summary="Generate up to 100 patients synchronously",
             responses={422: {"description": "Invalid request: `detail` names field and reason"},
                        503: {"description": "No model loaded"},
                        504: {"description": "Ran past `request_timeout_s`; generation stopped"}})
    async def post_patients(body: PatientsRequest, request: Request) -> Any:
        gen = model_generator(body.model)
        demographics = body.demographics()
        check_limits(body.strategy, body.params, len(demographics),
                     "patients" if body.patients is not None else "n",
                     settings.max_patients_per_request, settings.max_decoded_rows,
                     settings.max_retries_per_request)
        check_strategy(gen, body.strategy)
        check_codes(gen, body.must_include)
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        if body.any_of or body.exclude:  # targeted: its own engine calls (not micro-batched)
            patients = await bounded(request, targeted(gen, body, demographics, seed))
            return patients_response(gen, body, seed, demographics, patients)
        # Concurrent requests of equal strategy/params/validity share one engine call in the
        # inference pool (app.service.batcher); each gets exactly the patients it would alone.
        patients = await bounded(request, batcher_for(gen).generate(
            demographics, strategy=body.strategy, params=body.params, seed=seed,
            must_include=body.must_include, validity_mask=body.validity_mask))
        return patients_response(gen, body, seed, demographics, patients)

    async def targeted(gen, body: PatientsRequest, demographics: list[tuple[float, str]],
                       seed: int) -> list:
        """A targeted request in the inference pool; cancelled (timeout, client gone), the
        thread stops at its next engine batch, as the micro-batcher's requests do."""
        cancel = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                state.pool, lambda: gen.generate(
                    demographics, strategy=body.strategy, params=body.params, seed=seed,
                    must_include=body.must_include, validity_mask=body.validity_mask,
                    any_of=body.any_of, exclude=body.exclude, should_stop=cancel.is_set))
        except asyncio.CancelledError:
            cancel.set()
            raise

    def patients_response(gen, body: PatientsRequest, seed: int,
                          demographics: list[tuple[float, str]], patients: list) -> JSONResponse:
        metrics.patients.labels(body.strategy).inc(len(patients))
        tag = hashlib.sha256(f"{seed}:{gen.bundle_version}".encode()).hexdigest()[:8]
        context = exports.ExportContext.for_result(
            f"patients:{seed}:{gen.bundle_version}", getattr(gen, "visit_intervals", None))
        rows = [{"id": f"syn-{tag}-{i + 1:03d}", "n": i + 1, "age": a, "sex": s,
                 "visits": [list(v) for v in p.visits]}
                for i, (p, (a, s)) in enumerate(zip(patients, demographics, strict=True))]
        rows = [exports.patient_out(row, context.dates(row)) for row in rows]
        return JSONResponse({"bundle_version": gen.bundle_version, "strategy": body.strategy,
                             "seed": seed, "patients": rows})

    def result_urls(job_id: str) -> dict[str, str]:
        return {f: f"/{API_VERSION}/cohorts/{job_id}/result?format={f}"
                for f in exports.FORMATS}

    @v1.post("/cohorts", status_code=202, response_model=CohortStatus, tags=["cohorts"],
             summary="Submit a cohort job (or find the identical one already submitted)",
             responses={202: {"description": "Accepted; `Location` is the job's URL",
                              "headers": {"Location": {"schema": {"type": "string"}}}},
                        422: {"description": "Invalid spec: `detail` names field and reason"},
                        429: {"description": "Too many unfinished cohorts of this client"},
                        503: {"description": "No model loaded, or the store is unreachable"}})
    def post_cohort(spec: CohortSpec, response: Response, request: Request) -> Any:
        gen = model_generator(spec.model)
        if isinstance(state.generator, GeneratorSet):  # the default by name: one cache key
            spec = spec.model_copy(update={"model": state.generator.name_of(spec.model)})
        check_limits(spec.strategy, spec.params, spec.size, "size", settings.max_cohort_size,
                     settings.max_cohort_decoded_rows, settings.max_cohort_retries)
        check_strategy(gen, spec.strategy)
        check_codes(gen, spec.must_include)
        check_target = getattr(gen, "check_target", None)
        if check_target is not None:  # infeasible targeting: 422 now, not a failed job later
            ages, sexes = possible_demographics(spec)
            check_target(ages, sexes, spec.must_include, spec.any_of, spec.exclude,
                         spec.validity_mask)
        job_id = job_id_for(spec, gen.bundle_version)
        record = new_record(job_id, spec, gen.bundle_version, settings.chunk_size, time.time(),
                            settings.generation_batch,
                            results_folder(job_id, spec.size, settings.results_url,
                                           settings.result_inline_max_patients))
        client = client_key(dict(request.scope.get("headers") or []),
                            request.scope.get("client"), settings.api_key)
        try:
            record, created = store.submit(job_id, record, client=client,
                                           max_active=settings.max_active_cohorts_per_client)
        except TooManyJobs as err:
            metrics.jobs.labels("refused").inc()
            return JSONResponse(status_code=429, headers={"Retry-After": "30"}, content={
                "detail": f"this client already has {err.active} unfinished cohort jobs (at "
                          f"most {settings.max_active_cohorts_per_client}): wait for one to "
                          "finish or cancel one"})
        except store.connection_errors as err:
            return JSONResponse(status_code=503, content={
                "detail": f"job store unreachable: {redact_text(str(err))}"})
        metrics.jobs.labels("created" if created else "cached").inc()
        response.headers["Location"] = f"/{API_VERSION}/cohorts/{job_id}"
        log.info("cohort submitted", extra={"job": job_id, "size": spec.size,
                                            "new_job": created})
        return status_of(record, cached=not created, result_urls=result_urls(job_id),
                         warning=worker_warning())

    def worker_warning() -> str | None:
        """Why unfinished jobs will not move: no worker seen within ``lease_s``."""
        try:
            if store.live_workers(time.time(), settings.lease_s) > 0:
                return None
        except store.connection_errors:
            return None  # the status call reports the outage itself
        return (f"no cohort worker has been seen for {settings.lease_s:g} s: the job waits in "
                "the queue until one runs (`synthehr worker` with the same REDIS_URL)")

    def get_record(job_id: str) -> dict[str, str]:
        try:
            record = store.get(job_id)
        except store.connection_errors as err:
            from fastapi import HTTPException

            raise HTTPException(503, f"job store unreachable: {redact_text(str(err))}") from None
        if record is None:
            from fastapi import HTTPException

            raise HTTPException(404, f"no job {job_id}: never submitted, expired after the "
                                     "cache TTL, or lost by a store restarted without "
                                     "persistence (submit it again)")
        return record

    @v1.get("/cohorts/{job_id}", response_model=CohortStatus, tags=["cohorts"],
            summary="Status, progress, timings and error of a cohort job",
            responses={404: {"description": "Unknown job"}})
    def get_cohort(job_id: JobId) -> Any:
        record = get_record(job_id)
        warning = worker_warning() if record["status"] in ("queued", "running") else None
        return status_of(record, result_urls=result_urls(job_id), warning=warning)

    @v1.delete("/cohorts/{job_id}", response_model=CohortStatus, tags=["cohorts"],
               summary="Cancel a cohort job",
               responses={404: {"description": "Unknown job"},
                          409: {"description": "The job already finished"}})
    def delete_cohort(job_id: JobId) -> Any:
        record = get_record(job_id)
        if not store.cancel(job_id, time.time(), settings.cache_ttl_s):
            return JSONResponse(status_code=409, content={
                "detail": f"job {job_id} is already {record['status']}"})
        return status_of(get_record(job_id))

    @v1.get("/cohorts/{job_id}/result", tags=["cohorts"],
            summary="Download a finished cohort (streamed)",
            response_class=StreamingResponse,
            responses={200: {"description": "The cohort", "content": exports.openapi_content()},
                404: {"description": "Unknown job"},
                409: {"description": "The job is not done"},
                410: {"description": "The result expired from the store"}})
    def get_result(job_id: JobId,
                   format: Annotated[exports.Format, Query(
                       description=exports.format_description())] = "json") -> Any:
        record = get_record(job_id)
        if record["status"] != "done":
            return JSONResponse(status_code=409, content={
                "detail": f"job {job_id} is {record['status']}, not done",
                "status": status_of(record).model_dump()})
        # Every chunk must be there before the first byte goes out (a 200 cannot be taken back
        # mid-stream), and stay for the download: retain extends their expiry if it is close.
        if not result_available(store, record, settings.result_grace_s):
            return JSONResponse(status_code=410, content={
                "detail": f"the result of job {job_id} has expired or was lost by the store; "
                          "submit the cohort again to regenerate it"})
        meta = {"id": job_id, "bundle_version": record.get("bundle_version", ""),
                "count": int(record["total"])}
        gen = state.generator
        if isinstance(gen, GeneratorSet):
            gen = gen.by_version(record.get("bundle_version", "")) or gen
        context = exports.ExportContext.for_result(
            job_id, getattr(gen, "visit_intervals", None), concepts)
        body = exports.stream(format, lambda: iter_result(store, record), meta, context)
        name = f"cohort-{job_id[:12]}.{exports.EXTENSIONS[format]}"
        return StreamingResponse(body, media_type=exports.MEDIA_TYPES[format], headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "ETag": f'"{job_id}-{format}"'})

    @v1.get("/cohorts/{job_id}/report", tags=["cohorts"],
            summary="A finished cohort compared with the training split's aggregates",
            response_class=HTMLResponse,
            responses={200: {"description": "HTML page (inline SVG charts), or JSON with "
                                            "`Accept: application/json`",
                             "content": {"text/html": {}, "application/json": {}}},
                       404: {"description": "Unknown job"},
                       409: {"description": "The job is not done"},
                       503: {"description": "No model, or no training-split statistics"}})
    def get_report(job_id: JobId, request: Request) -> Any:
        record = get_record(job_id)
        if record["status"] != "done":
            return JSONResponse(status_code=409, content={
                "detail": f"job {job_id} is {record['status']}, not done"})
        return cohort_report.respond(job_id, record, ready_generator(),
                                     iter_result(store, record),
                                     request.headers.get("accept", ""))

    @v1.get("/models", response_model=ModelInfo, tags=["model"],
            summary="The loaded bundles' manifests and evaluation summaries (default first)")
    def get_models() -> Any:
        gen = ready_generator()
        named = (gen.generators if isinstance(gen, GeneratorSet)
                 else {model_name(gen): gen})
        infos = [ModelInfo(name=name, default=i == 0, bundle_version=g.bundle_version,
                           strategies=list(g.strategies), manifest=g.manifest,
                           evaluation=g.evaluation, privacy=g.manifest.get("privacy"),
                           unavailable_strategies=dict(getattr(g, "unavailable", {}) or {}))
                 for i, (name, g) in enumerate(named.items())]
        return infos[0].model_copy(update={"models": infos})

    @v1.get("/codes/{code}", response_model=CodeDetail, tags=["model"],
            summary="An ICD-9-CM code's category, chapter and description",
            responses={404: {"description": "Well-formed, but not a code of CMS v32"},
                       422: {"description": "Not an ICD-9-CM code"}})
    def get_code(code: Annotated[str, Path(max_length=16, examples=["250.00"],
                                           description="Any spelling: `250.00` or `25000`")]
                 ) -> Any:
        try:
            info = load_hierarchy().lookup(code)
        except InvalidCodeError as err:
            raise _Invalid("code", str(err), where="path") from None
        if info.code not in cms_codes():
            from fastapi import HTTPException

            raise HTTPException(404, f"{info.code} is shaped like an ICD-9-CM code but is not "
                                     "in CMS ICD-9-CM v32 (neither a billable code nor a "
                                     "category or subcategory of one)")
        in_vocab = state.generator.has_code(info.code) if state.generator is not None else None
        return CodeDetail(code=info.code, category=info.category, chapter=info.chapter.key,
                          chapter_title=info.chapter.title, billable=info.billable,
                          description=info.description,
                          category_description=info.category_description,
                          in_model_vocabulary=in_vocab)

    app.include_router(v1)

    @app.get("/health", tags=["ops"], summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="Readiness: bundle loaded and store reachable",
             responses={503: {"description": "Not ready; the body says why"}})
    def ready() -> Any:
        store_ok = store.ping()
        workers = None
        if store_ok:
            try:
                workers = store.live_workers(time.time(), settings.lease_s)
            except store.connection_errors:
                workers = None
        body = {"ready": state.generator is not None and store_ok,
                "bundle_loaded": state.generator is not None,
                "bundle_version": getattr(state.generator, "bundle_version", None),
                "bundle_error": state.load_error, "store": store.kind,
                "store_reachable": store_ok,
                # Cohort jobs need a worker; synchronous patients do not, so readiness (the
                # status code) stays about this process and the cohort side is reported here.
                "workers_alive": workers, "cohorts_ready": bool(workers),
                "cohorts_warning": None if workers else worker_warning()}
        metrics.ready.set(1 if body["ready"] else 0)
        return JSONResponse(status_code=200 if body["ready"] else 503, content=body)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics",
             response_class=PlainTextResponse)
    def prometheus() -> Response:
        try:
            metrics.queue.set(store.queue_length())
        except Exception:  # noqa: BLE001, S110 - metrics must answer when the store is down
            pass
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.request_id = uuid.uuid4().hex
    return app
