"""The cohort worker: claims jobs from the store, generates them chunk by chunk, reports progress.

Run as its own process (``synthehr worker``, any number of them against one Redis), or as a
thread inside the API when there is no Redis (the embedded store). While it runs, it records
its presence in the store every third of ``lease_s``. Every idle poll also reaps:
a job whose worker's heartbeat is older than the lease (the worker died or hangs) goes back on
the queue, and the next worker resumes it from the chunks already stored.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from app.service.jobs import JobAbandoned, run_job
from app.service.redact import redact_text
from app.service.store import JobStore
from app.settings import Settings

__all__ = ["Worker"]

log = logging.getLogger("synthehr.worker")


class Worker:
    def __init__(self, store: JobStore, generator, settings: Settings,
                 name: str | None = None) -> None:
        self.store = store
        self.generator = generator
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.jobs_done = 0
        self._last_reap = 0.0

    def _reap(self) -> None:
        now = time.time()
        if now - self._last_reap < self.settings.lease_s / 2:
            return
        self._last_reap = now
        for job_id in self.store.reap(now, self.settings.lease_s):
            log.warning("job re-queued: its worker's heartbeat expired",
                        extra={"job": job_id, "worker": self.name})

    def run_once(self, stop: threading.Event | None = None) -> bool:
        """Reap, claim one job and run it; False when the queue was empty."""
        self._reap()
        job_id = self.store.claim(self.name, time.time())
        if job_id is None:
            return False
        started = time.perf_counter()
        try:
            status = run_job(self.store, self.generator, job_id, self.name,
                             ttl=self.settings.cache_ttl_s, lease_s=self.settings.lease_s,
                             batch=self.settings.generation_batch, stop=stop)
            self.jobs_done += 1
            log.info("job finished", extra={"job": job_id, "status": status,
                                            "seconds": round(time.perf_counter() - started, 3)})
        except JobAbandoned as err:
            log.warning("job abandoned", extra={"job": job_id, "reason": str(err)})
        except self.store.connection_errors:
            raise
        except Exception as err:
            log.exception("job failed", extra={"job": job_id})
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
        """Work until ``stop`` is set (or ``max_jobs`` were run); survives store outages."""
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
