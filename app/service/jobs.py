"""Cohort jobs: ids, the deterministic chunk plan, and running a job chunk by chunk.

A job's id is a hash of its spec (seed included) and the bundle version, so the same request
against the same model finds the same job, and once done, its cached result.

The cohort is cut into chunks of ``chunk_size`` patients. Everything about patient ``k`` - its
demographics, its id, the randomness the engine decodes it with - is a pure function of
(spec, job id, k): demographics are drawn in fixed blocks of :data:`PLAN_BLOCK` patients, and
the engine decodes patient ``k`` as row ``k - 1`` of a request with the spec's seed. So the
result does not depend on the deployment's ``chunk_size`` or ``generation_batch`` (neither is
in the job id), and a chunk re-run after a worker died produces the same bytes and overwrites
the earlier copy in the store: processing is at-least-once, the result is exactly-once (exactly
``size`` patients, no duplicates, nothing lost). One exception: with ``any_of``, the early stop
of the re-draw tries is decided over one engine call's patients
(:meth:`app.decoding.targeting.Targeting.sample_any_of`), so such a result also depends on the
job's ``chunk_size`` and ``batch``, both fixed in its record at submission (a re-run chunk still
gives the same bytes).

The spec in the id includes its ``model`` (the bundle's name when several are loaded),
``any_of`` and ``exclude``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self

import numpy as np

from app.service.schemas import AgeBins, AgeRange, CohortSpec, CohortStatus, Progress
from app.service.store import JobStore

__all__ = [
    "JobAbandoned",
    "chunk_plan",
    "generate_chunk",
    "iter_result",
    "job_id_for",
    "new_record",
    "possible_demographics",
    "run_job",
    "status_of",
]

log = logging.getLogger("synthehr.jobs")


class JobAbandoned(RuntimeError):
    """The job was cancelled, vanished from the store, or taken over by another worker."""


def canonical_spec(spec: CohortSpec) -> dict:
    return spec.model_dump(mode="json")


# Demographics are drawn PLAN_BLOCK patients at a time (a constant, not a setting: it shapes
# the result). PLAN_VERSION is in the job id, so results of an earlier plan are never mixed in.
PLAN_BLOCK = 1000
PLAN_VERSION = 2


def job_id_for(spec: CohortSpec, bundle_version: str) -> str:
    """Hash of (spec, seed, bundle version, plan): identical requests share one job and
    result."""
    text = json.dumps({"spec": canonical_spec(spec), "bundle": bundle_version,
                       "plan": PLAN_VERSION}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def chunk_bounds(size: int, chunk_size: int, index: int) -> tuple[int, int]:
    start = index * chunk_size
    return start, min(size, start + chunk_size)


def chunk_plan(spec: CohortSpec, index: int, chunk_size: int) -> list[tuple[float, str]]:
    """Demographics ``(age, sex)`` of chunk ``index``'s patients (deterministic, and the same
    for a patient whatever ``chunk_size`` is)."""
    start, stop = chunk_bounds(spec.size, chunk_size, index)
    out: list[tuple[float, str]] = []
    for block in range(start // PLAN_BLOCK, (stop - 1) // PLAN_BLOCK + 1 if stop > start else 0):
        first = block * PLAN_BLOCK
        rows = _block_plan(spec, block, min(PLAN_BLOCK, spec.size - first))
        out.extend(rows[max(start, first) - first:min(stop, first + PLAN_BLOCK) - first])
    return out


def _block_plan(spec: CohortSpec, block: int, n: int) -> list[tuple[float, str]]:
    """Demographics of the ``n`` patients of plan block ``block``."""
    rng = np.random.default_rng([spec.seed, block, 0x5EED])
    age = spec.age
    if isinstance(age, AgeBins):
        weights = np.array([b.weight for b in age.bins], dtype=float)
        picks = rng.choice(len(age.bins), size=n, p=weights / weights.sum())
        lows = np.array([age.bins[i].min for i in picks])
        highs = np.array([age.bins[i].max for i in picks])
        ages = lows + rng.random(n) * (highs - lows)
    elif isinstance(age, AgeRange):
        ages = age.min + rng.random(n) * (age.max - age.min)
    else:
        ages = np.full(n, float(age))
    ages = np.round(ages, 1)
    female = rng.random(n) < spec.female_fraction
    return [(float(a), "F" if f else "M") for a, f in zip(ages, female, strict=True)]


def possible_demographics(spec: CohortSpec) -> tuple[list[int], list[str]]:
    """Every whole-year age (as the MCE edits count them) and sex the cohort may draw."""
    age = spec.age
    if isinstance(age, AgeBins):
        spans = [(b.min, b.max) for b in age.bins]
    elif isinstance(age, AgeRange):
        spans = [(age.min, age.max)]
    else:
        spans = [(float(age), float(age))]
    # chunk_plan rounds ages to 0.1 year, so 17.96 can become 18.0: bound the rounded ages
    ages = sorted({a for low, high in spans
                   for a in range(math.floor(round(low, 1)), math.floor(round(high, 1)) + 1)})
    sexes = [s for s, share in (("F", spec.female_fraction), ("M", 1 - spec.female_fraction))
             if share > 0]
    return ages, sexes


def patient_id(job_id: str, number: int) -> str:
    return f"syn-{job_id[:8]}-{number:06d}"


def new_record(job_id: str, spec: CohortSpec, bundle_version: str, chunk_size: int,
               now: float, batch: int = 64) -> dict[str, str]:
    return {"batch": str(batch),
        "id": job_id, "spec": json.dumps(canonical_spec(spec), sort_keys=True),
        "status": "queued", "total": str(spec.size), "done": "0",
        "chunk_size": str(chunk_size), "n_chunks": str(math.ceil(spec.size / chunk_size)),
        "bundle_version": bundle_version, "created_at": repr(now), "started_at": "",
        "finished_at": "", "error": "", "attempts": "0", "worker": "", "heartbeat": "",
    }


def _f(value: str | None) -> float | None:
    return float(value) if value else None


def status_of(record: dict[str, str], cached: bool = False,
              result_urls: dict[str, str] | None = None,
              warning: str | None = None) -> CohortStatus:
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


# -- running a job ----------------------------------------------------------------------------

GenerateFn = Callable[..., list]


@dataclass
class _Heartbeat:
    store: JobStore
    job_id: str
    worker: str
    every_s: float

    def __post_init__(self) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"heartbeat-{self.job_id[:8]}")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self.store.heartbeat(self.job_id, self.worker, time.time()):
                    self.lost.set()
                    return
            except Exception as err:  # noqa: BLE001 - a store outage: keep trying
                log.warning("heartbeat failed", extra={"job": self.job_id, "error": str(err)})

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def encode_chunk(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r, separators=(",", ":")) for r in rows).encode()


def decode_chunk(payload: bytes) -> list[dict]:
    return [json.loads(line) for line in payload.decode().splitlines() if line]


def generate_chunk(generator, spec: CohortSpec, job_id: str, index: int, chunk_size: int,
                   batch: int) -> list[dict]:
    """The rows of chunk ``index`` (a pure function of its arguments and the bundle):
    ``{"id", "n", "age", "sex", "visits"}``, ``batch`` patients per engine call."""
    if hasattr(generator, "for_model"):  # several bundles: the job's own (app.service.models)
        generator = generator.for_model(spec.model)
    start, _ = chunk_bounds(spec.size, chunk_size, index)
    demographics = chunk_plan(spec, index, chunk_size)
    rows = []
    for offset in range(0, len(demographics), batch):
        part = demographics[offset:offset + batch]
        targets = {k: v for k, v in (("any_of", spec.any_of), ("exclude", spec.exclude)) if v}
        # Patient k is row k - 1 of the spec's seed: its bytes ignore the chunking.
        patients = generator.generate(
            part, strategy=spec.strategy, params=spec.params, seed=spec.seed,
            must_include=spec.must_include, validity_mask=spec.validity_mask,
            first_index=start + offset, **targets)
        for k, p in enumerate(patients):
            number = start + offset + k + 1
            rows.append({"id": patient_id(job_id, number), "n": number,
                         "age": part[k][0], "sex": part[k][1],
                         "visits": [list(v) for v in p.visits]})
    return rows


def run_job(store: JobStore, generator, job_id: str, worker: str, *, ttl: int,
            lease_s: float, batch: int = 64,
            stop: threading.Event | None = None) -> str:
    """Generate every missing chunk of ``job_id``; returns the final status seen.

    Raises :class:`JobAbandoned` when the job disappears, is cancelled or taken over, and the
    store's connection errors when the store is unreachable (the caller retries; chunks already
    stored are kept).
    """
    record = store.get(job_id)
    if record is None:
        raise JobAbandoned(f"job {job_id} is not in the store")
    spec = CohortSpec.model_validate_json(record["spec"])
    chunk_size, n_chunks = int(record["chunk_size"]), int(record["n_chunks"])
    batch = int(record.get("batch") or batch)  # fixed per job: retries give the same bytes
    have = store.chunk_indices(job_id)
    log.info("job picked up", extra={"job": job_id, "worker": worker,
                                      "chunks_done": len(have), "chunks": n_chunks})
    status = record["status"]
    with _Heartbeat(store, job_id, worker, max(0.2, lease_s / 3)) as beat:
        for index in range(n_chunks):
            if index in have:
                continue
            if beat.lost.is_set():
                raise JobAbandoned(f"job {job_id} was cancelled or taken over")
            if stop is not None and stop.is_set():
                raise JobAbandoned("worker stopping")
            rows = generate_chunk(generator, spec, job_id, index, chunk_size, batch)
            status = store.put_chunk(job_id, index, encode_chunk(rows), len(rows),
                                     time.time(), ttl)
            if status == "done":
                log.info("job done", extra={"job": job_id, "worker": worker})
                return status
            if status != "ok":
                raise JobAbandoned(f"job {job_id} is {status}")
    record = store.get(job_id)
    return record["status"] if record else "gone"


def iter_result(store: JobStore, record: dict[str, str]) -> Iterator[dict]:
    """The patients of a done job, in order, one chunk read at a time."""
    for index in range(int(record["n_chunks"])):
        payload = store.get_chunk(record["id"], index)
        if payload is None:
            raise RuntimeError(f"chunk {index} of job {record['id']} is missing from the store "
                               "(expired or the store lost it)")
        yield from decode_chunk(payload)
