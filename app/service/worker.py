"""The cohort worker: leases chunks from the store, generates and stores them, one at a time.

Run as its own process (``synthehr worker``, any number of them against one Redis), or as a
thread inside the API when there is no Redis (the embedded store). Every worker leases the next
free chunk of the oldest unfinished cohort, so all live workers share one cohort. While it
runs, it records its presence in the store every third of ``lease_s``. A chunk whose worker's
heartbeat is older than the lease (the worker died or hangs) is taken over by the next claim,
and the job resumes from the chunks already stored. When idle, a worker also deletes the result
files of jobs the store has forgotten (every ``results_sweep_s``). Chunks are decoded by the
generation service (:mod:`app.runtime.generation`): the API's own when the worker runs inside it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from app.runtime.generation import GenerationService
from app.runtime.redact import redact_text
from app.service.jobs import JobAbandoned, run_chunk
from app.service.results import sweep_orphans
from app.service.store import JobStore
from app.settings import Settings

__all__ = ["Worker"]

log = logging.getLogger("synthehr.worker")


class Worker:
    """Runs cohort chunks with ``generation`` (a :class:`GenerationService`, or the generator
    or bundle set one is made over)."""

    def __init__(self, store: JobStore, generation: GenerationService | Any, settings: Settings,
                 name: str | None = None) -> None:
        self.store = store
        self.generation = GenerationService.of(generation)
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.jobs_done = 0  # jobs whose last chunk this worker stored
        self.chunks_done = 0
        self._last_sweep = 0.0

    def _sweep(self) -> None:
        """Delete result folders of jobs the store no longer has (at most every
        ``results_sweep_s``; only when this deployment keeps results in files)."""
        url = self.settings.results_url
        now = time.time()
        if not url or now - self._last_sweep < self.settings.results_sweep_s:
            return
        self._last_sweep = now
        try:
            removed = sweep_orphans(url, lambda job_id: self.store.get(job_id) is not None)
        except OSError as err:
            log.warning("result sweep failed", extra={"worker": self.name, "error": str(err)})
            return
        if removed:
            log.info("result files of expired jobs removed",
                     extra={"worker": self.name, "jobs": removed})

    def run_once(self, stop: threading.Event | None = None) -> bool:
        """Lease one chunk and run it; False when there was no work (then sweep)."""
        lease = self.store.claim(self.name, time.time(), self.settings.lease_s)
        if lease is None:
            self._sweep()
            return False
        job_id = lease.job_id
        if lease.takeover:
            log.warning("chunk re-queued: its worker's lease expired",
                        extra={"job": job_id, "chunk": lease.index, "worker": self.name})
        started = time.perf_counter()
        try:
            status = run_chunk(self.store, self.generation, lease, self.name,
                               ttl=self.settings.cache_ttl_s, lease_s=self.settings.lease_s,
                               batch=self.settings.generation_batch, stop=stop)
            self.chunks_done += 1
            log.debug("chunk stored", extra={"job": job_id, "chunk": lease.index,
                                             "seconds": round(time.perf_counter() - started, 3)})
            if status == "done":
                self.jobs_done += 1
                log.info("job finished", extra={"job": job_id, "status": status,
                                                "worker": self.name})
        except JobAbandoned as err:
            log.warning("chunk abandoned", extra={"job": job_id, "chunk": lease.index,
                                                  "reason": str(err)})
        except self.store.connection_errors:
            raise
        except Exception as err:
            log.exception("job failed", extra={"job": job_id, "chunk": lease.index})
            self.store.fail(job_id, redact_text(f"{type(err).__name__}: {err}"), time.time(),
                            self.settings.cache_ttl_s)
        return True

    def _announce(self, stop: threading.Event) -> None:
        """Tell the store this worker is alive every third of a lease, busy or idle, so the
        API can report queued cohorts that no live worker will pick up."""
        every = max(0.1, self.settings.lease_s / 3)
        while True:
            try:
                self.store.worker_seen(self.name, time.time())
            except Exception as err:  # noqa: BLE001 - an outage: the main loop reports it
                log.debug("presence not recorded", extra={"worker": self.name,
                                                          "error": str(err)})
            if stop.wait(every):
                return

    def run(self, stop: threading.Event, max_jobs: int | None = None) -> None:
        """Work until ``stop`` is set (or this worker finished ``max_jobs`` jobs, i.e. stored
        their last chunk); survives store outages."""
        log.info("worker started", extra={"worker": self.name, "store": self.store.kind})
        done = threading.Event()
        presence = threading.Thread(target=self._announce, args=(done,), daemon=True,
                                    name=f"presence-{self.name}")
        presence.start()
        try:
            self._loop(stop, max_jobs)
        finally:
            done.set()
            presence.join(timeout=5)
        log.info("worker stopped", extra={"worker": self.name})

    def _loop(self, stop: threading.Event, max_jobs: int | None) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                if not self.run_once(stop):
                    stop.wait(self.settings.worker_poll_s)
                backoff = 0.1
            except self.store.connection_errors as err:
                log.warning("store unreachable; retrying",
                            extra={"worker": self.name, "error": str(err),
                                   "retry_in_s": backoff})
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            if max_jobs is not None and self.jobs_done >= max_jobs:
                break


def start_thread(worker: Worker, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True,
                              name=f"worker-{worker.name}")
    thread.start()
    return thread
