"""The generation service: the one door from every caller to a bundle's decoding engine.

The API's routes, the cohort worker (:mod:`app.service.jobs`), ``synthehr generate``
(:mod:`app.service.cohort_file`) and the evaluator (:mod:`training.evaluate`) all generate
through :class:`GenerationService`, in three steps:

1. :meth:`GenerationService.prepare` checks a typed request (:mod:`app.runtime.requests`,
   whose fields were validated when it was built) once against the deployment and the bundle:
   the model it names, the deployment's limits and work budget (:class:`Limits`), whether the
   bundle serves its strategy, whether its required codes are in the vocabulary and, for a
   cohort, whether its targeting can be met for every age and sex the cohort may draw. It
   draws the seed when the request has none. A refusal raises :class:`InvalidRequestError`
   naming the field. What comes out, :class:`Prepared` (the parameters parsed, the bundle
   resolved), is what the service decodes: nothing checks it again. A request checked before
   (a cohort spec read back from the job store) is bound with :meth:`GenerationService.bind`.
2. :meth:`GenerationService.generate` decodes prepared rows in the caller's thread (the
   worker, the evaluator, the cohort file writer: one call at a time, nothing to batch with).
   :meth:`GenerationService.generate_async` decodes off the event loop for the API: through the
   service's micro-batching queue (:mod:`app.runtime.batcher`), which merges concurrent
   requests of equal strategy, params and validity flag into one engine call, or, for a
   targeted request, in the inference pool. Cancelling it stops the engine work at its next
   engine batch.
3. :func:`patient_rows` turns patients into the rows every output is made from
   (``{"id", "n", "age", "sex", "visits"}``), naming each patient with :func:`patient_id`.

Patient ``k`` of a request is decoded as row ``k`` of its seed whichever path it takes, so the
same demographics and seed give the same patients synchronously, in a cohort chunk (which passes
its first patient's number) and in an evaluation.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from app.corpus import Patient
from app.decoding.errors import InvalidParametersError
from app.decoding.params import PlainParams, work_of
from app.runtime.batcher import MicroBatcher
from app.runtime.bundles import GeneratorSet, UnknownModelError, model_name
from app.runtime.requests import GenerationRequest

__all__ = [
    "Batching",
    "GenerationService",
    "InvalidRequestError",
    "Limits",
    "Prepared",
    "patient_id",
    "patient_rows",
    "request_scope",
]

Demographics = Sequence[tuple[float, str]]
# The ages (whole years) and sexes a cohort may draw: its targeting must hold for all of them.
Domain = tuple[Sequence[int], Sequence[str]]


class InvalidRequestError(InvalidParametersError):
    """A request the generation service refuses before decoding anything. ``field`` names the
    request field at fault (``must_include.0``, ``params.max_visits``, ``n``); ``also`` names
    further fields the same reason applies to (a work budget exceeded by their product)."""

    def __init__(self, field: str, message: str, also: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.also = also


@dataclass(frozen=True)
class Limits:
    """A deployment's bounds on one request (from :class:`app.settings.Settings`)."""

    patients: int  # patients in the request (a cohort's size)
    rows: int  # rows decoded: patients x candidates for rerank, patients otherwise
    retries: int  # privacy-guard retries: patients x max_retries (retrieve_edit)
    max_retries: int  # the request's own max_retries
    max_visits: int
    max_codes_per_visit: int

    @classmethod
    def for_patients(cls, settings: Any) -> Limits:
        """The bounds of ``POST /v1/patients``."""
        return cls(settings.max_patients_per_request, settings.max_decoded_rows,
                   settings.max_retries_per_request, settings.max_retries, settings.max_visits,
                   settings.max_codes_per_visit)

    @classmethod
    def for_cohorts(cls, settings: Any) -> Limits:
        """The bounds of one cohort job."""
        return cls(settings.max_cohort_size, settings.max_cohort_decoded_rows,
                   settings.max_cohort_retries, settings.max_retries, settings.max_visits,
                   settings.max_codes_per_visit)


@dataclass(frozen=True)
class Batching:
    """The micro-batching queue's settings; ``window_s = 0`` turns batching off."""

    window_s: float = 0.0
    max_patients: int = 64
    slots: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> Batching:
        return cls(settings.batch_window_ms / 1000.0, settings.max_batch_patients,
                   min(settings.batch_concurrency, settings.inference_threads))


@dataclass(frozen=True)
class Prepared:
    """A request checked by :meth:`GenerationService.prepare`: what the service decodes."""

    generator: Any  # the bundle's generator (app.runtime.generators)
    model: str | None  # the model's canonical name (None: the only bundle, unnamed)
    strategy: str
    params: PlainParams  # parsed once, when the request was built
    seed: int
    must_include: list[str]
    any_of: list[str]
    exclude: list[str]
    validity_mask: bool

    @property
    def bundle_version(self) -> str:
        return self.generator.bundle_version

    @property
    def targeted(self) -> bool:
        return bool(self.any_of or self.exclude)


def patient_id(scope: str, number: int, width: int) -> str:
    """``syn-<scope>-<number>``, the number zero-padded to ``width`` digits: a synthetic id,
    never a training record's. A cohort's scope is its job id's first 8 hex digits (6 digits);
    a synchronous request's is :func:`request_scope` (3 digits)."""
    return f"syn-{scope}-{number:0{width}d}"


def request_scope(seed: int, bundle_version: str) -> str:
    """The id scope of a synchronous request: its seed and bundle, hashed."""
    return hashlib.sha256(f"{seed}:{bundle_version}".encode()).hexdigest()[:8]


def patient_rows(patients: Sequence[Patient], demographics: Demographics, *, scope: str,
                 width: int, first: int = 1) -> list[dict]:
    """One row per patient, numbered from ``first``: ``{"id", "n", "age", "sex", "visits"}``,
    what the API's responses, the cohort chunks and every export are made from."""
    return [{"id": patient_id(scope, first + k, width), "n": first + k, "age": age, "sex": sex,
             "visits": [list(v) for v in p.visits]}
            for k, (p, (age, sex)) in enumerate(zip(patients, demographics, strict=True))]


class GenerationService:
    """Checks requests once and decodes them with the loaded bundle(s) (see the module doc).

    ``generator`` is a generator (:mod:`app.runtime.generators`) or a
    :class:`~app.runtime.bundles.GeneratorSet`; ``on_batch(requests, patients)`` is told about
    every engine call of :meth:`generate_async` (the API's batch-size metric).
    """

    def __init__(self, generator: Any, batching: Batching = Batching(), *,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        if generator is None:
            raise ValueError("no generator to serve")
        self.generator = generator
        self.batching = batching
        self.on_batch = on_batch
        self._executor: Executor | None = None
        self._queues: dict[int, MicroBatcher] = {}

    @classmethod
    def from_settings(cls, generator: Any, settings: Any, *,
                      on_batch: Callable[[int, int], None] | None = None) -> GenerationService:
        """A service batching as ``settings`` say (:class:`Batching`)."""
        return cls(generator, Batching.from_settings(settings), on_batch=on_batch)

    @classmethod
    def of(cls, generator: Any) -> GenerationService:
        """``generator`` itself when it is a service, else a service over it."""
        return generator if isinstance(generator, GenerationService) else cls(generator)

    @classmethod
    def over_engine(cls, engine: Any, manifest: dict[str, Any] | None = None
                    ) -> GenerationService:
        """A service over a bare decoding engine (the evaluator's, built with its own batch
        size and threads), with no bundle identity to speak of."""
        from app.runtime.generators import EngineGenerator

        return cls(EngineGenerator(engine, manifest or {}, "engine"))

    # -- checking ------------------------------------------------------------------------------
    def resolve(self, model: str | None) -> tuple[Any, str | None]:
        """The generator ``model`` names and its canonical name; :class:`InvalidRequestError`
        on ``model`` for one this service has not loaded."""
        gen = self.generator
        if isinstance(gen, GeneratorSet):
            try:
                return gen.for_model(model), gen.name_of(model)
            except UnknownModelError as err:
                raise InvalidRequestError("model", str(err)) from None
        if model is not None and model != model_name(gen):
            raise InvalidRequestError("model", f"unknown model {model!r}; loaded: "
                                               f"{model_name(gen) or 'one unnamed bundle'}")
        return gen, model

    def prepare(self, request: GenerationRequest, *, n: int = 0, n_field: str = "n",
                limits: Limits | None = None, domain: Domain | None = None) -> Prepared:
        """``request`` checked once for ``n`` patients (counted by ``n_field``): its model,
        ``limits`` (None: none), the strategy, the required codes and, given the ``domain``
        (ages and sexes) a cohort may draw, its targeting. Raises
        :class:`InvalidRequestError`, or the targeting's ``TargetError`` naming the field."""
        gen, model = self.resolve(request.model)
        params = request.parsed_params()
        if limits is not None:
            _check_limits(request, params, n, n_field, limits)
        reason = (getattr(gen, "unavailable", None) or {}).get(request.strategy)
        if reason:
            raise InvalidRequestError("strategy", f"strategy {request.strategy!r} is not "
                                                  f"available: {reason}")
        for i, code in enumerate(request.must_include):
            if not gen.has_code(code):
                raise InvalidRequestError(f"must_include.{i}", f"code {code} is not in the "
                                          "model's vocabulary (it never occurred in its "
                                          "training data)")
        check_target = getattr(gen, "check_target", None)
        if domain is not None and check_target is not None:  # infeasible: refused, not failed
            check_target(list(domain[0]), list(domain[1]), request.must_include,
                         request.any_of, request.exclude, request.validity_mask)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        return self._prepared(gen, model, request, params, seed)

    def bind(self, request: GenerationRequest) -> Prepared:
        """A request checked when it was accepted (a cohort spec read back from the job
        store), bound to its bundle; nothing is checked again."""
        gen = self.generator
        if isinstance(gen, GeneratorSet):
            gen = gen.for_model(request.model)
        seed = request.seed if request.seed is not None else 0
        return self._prepared(gen, request.model, request, request.parsed_params(), seed)

    @staticmethod
    def _prepared(gen: Any, model: str | None, request: GenerationRequest, params: PlainParams,
                  seed: int) -> Prepared:
        return Prepared(gen, model, request.strategy, params, int(seed),
                        list(request.must_include), list(request.any_of),
                        list(request.exclude), request.validity_mask)

    # -- decoding ------------------------------------------------------------------------------
    def generate(self, request: Prepared, demographics: Demographics, *, first_index: int = 0,
                 should_stop: Callable[[], bool] | None = None) -> list[Patient]:
        """The patients of ``demographics``, decoded in this thread; patient ``i`` is row
        ``first_index + i`` of the request's seed. ``should_stop`` is asked between engine
        batches (``GenerationStopped`` when it says yes)."""
        # Optional keywords only when used: a minimal generator need not take them.
        options: dict[str, Any] = {}
        if first_index:
            options["first_index"] = first_index
        if should_stop is not None:
            options["should_stop"] = should_stop
        if request.targeted:
            options.update(any_of=request.any_of, exclude=request.exclude)
        return request.generator.generate(
            list(demographics), strategy=request.strategy, params=request.params,
            seed=request.seed, must_include=request.must_include,
            validity_mask=request.validity_mask, **options)

    async def generate_async(self, request: Prepared, demographics: Demographics
                             ) -> list[Patient]:
        """:meth:`generate` off the event loop: untargeted requests through the
        micro-batching queue, targeted ones (their own engine calls) in the inference pool.
        Cancelled (a timeout, a client gone), the engine stops at its next batch."""
        if not request.targeted:
            return await self._queue(request.generator).generate(
                list(demographics), request.strategy, request.params, request.seed,
                request.must_include, request.validity_mask)
        cancel = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor,
                lambda: self.generate(request, demographics, should_stop=cancel.is_set))
        except asyncio.CancelledError:
            cancel.set()  # the thread stops at its next engine batch
            raise

    # -- the queue -----------------------------------------------------------------------------
    def open(self, executor: Executor | None) -> None:
        """Decode :meth:`generate_async` calls in ``executor`` (the API's inference pool, one
        per lifespan; None: the event loop's default pool); the queues start empty."""
        self._executor = executor
        self._queues.clear()

    def close(self) -> None:
        self.open(None)

    def _queue(self, generator: Any) -> MicroBatcher:
        """The micro-batching queue of one bundle (requests of different bundles never share
        an engine call)."""
        queue = self._queues.get(id(generator))
        if queue is None:
            queue = self._queues[id(generator)] = MicroBatcher(
                generator, self._executor, self.batching.window_s, self.batching.max_patients,
                self.batching.slots, on_batch=self.on_batch)
        return queue


def _check_limits(request: GenerationRequest, params: PlainParams, n: int, n_field: str,
                  limits: Limits) -> None:
    """The deployment's limits: patients, the request's own caps, and the work budget (what the
    engine may be asked to decode, :func:`app.decoding.params.work_of`)."""
    if n > limits.patients:
        raise InvalidRequestError(n_field, f"at most {limits.patients} patients per request "
                                           f"here, got {n}")
    given = request.params  # the values the caller set: a default is never refused
    retries = given.get("max_retries")
    if retries is not None and retries > limits.max_retries:
        raise InvalidRequestError("params.max_retries",
                                  f"at most {limits.max_retries}, got {retries}")
    work = work_of(request.strategy, params, n)
    if work.rows > limits.rows:
        factor = f"params.{work.rows_field}"
        raise InvalidRequestError(n_field, f"this request decodes {work.rows} rows ({n_field} x "
                                  f"{factor}); the budget here is {limits.rows}: ask for fewer "
                                  "patients or candidates", also=(factor,))
    if work.retries > limits.retries:
        raise InvalidRequestError(n_field, f"this request allows {work.retries} retries "
                                  f"({n_field} x params.max_retries); the budget here is "
                                  f"{limits.retries}: ask for fewer patients or retries",
                                  also=("params.max_retries",))
    mv = given.get("max_visits")
    if mv is not None and mv > limits.max_visits:
        raise InvalidRequestError("params.max_visits", f"at most {limits.max_visits}, got {mv}")
    mc = given.get("max_codes_per_visit")
    if mc is not None and mc > limits.max_codes_per_visit:
        raise InvalidRequestError("params.max_codes_per_visit",
                                  f"at most {limits.max_codes_per_visit}, got {mc}")
