"""The generation service's micro-batching queue (:mod:`app.runtime.generation`).

One patient decoded alone leaves most of a CPU core idle between tiny matrix products; decoded
together with others it costs a fraction of that (the engine's tokens/s at batch 32 is several
times its tokens/s at batch 1). :class:`MicroBatcher` therefore coalesces concurrent requests
that agree on ``(strategy, params, validity_mask)``: the first one opens a group, the others
join it for up to ``window_s`` seconds (or until ``max_patients`` patients are in it), and the
group runs as one engine call in the inference thread pool. Each request's patients are then
handed back to it.

A request's output does not depend on its neighbours: the engine keys every row's randomness
on (request seed, patient index in the request, stream, step) - see ``row_seeds`` and
``row_indices`` of :meth:`app.decoding.engine.Engine.generate` - and ``must_include`` is passed
per row. A merged call that raises (one request's impossible constraint, a privacy-guard give-up)
is re-run request by request, so every request gets exactly the answer or error it would get
alone.

A request that finds the engine idle (nothing running, nothing waiting) runs at once: the window
only applies under load, so a lone client pays no extra latency. At most ``slots`` groups run at
once (the pool's size); while every slot is busy, waiting groups keep accepting requests past
their window (up to ``max_patients``), so batches grow with the load instead of queueing behind
each other. ``window_s = 0`` turns batching off: every request is one engine call, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MicroBatcher"]

log = logging.getLogger("synthehr.batcher")


@dataclass
class _Request:
    demographics: list[tuple[float, str]]
    seed: int
    must_include: list[str]
    future: asyncio.Future
    # Set when the request's caller stopped waiting (client gone, timeout): read from the
    # inference thread between engine batches, so a group nobody waits for stops decoding.
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Group:
    key: tuple
    strategy: str
    params: Any  # a dict or the strategy's parsed parameter model
    validity_mask: bool
    items: list[_Request] = field(default_factory=list)
    n_patients: int = 0
    timer: asyncio.TimerHandle | None = None
    queued: bool = False  # in the ready queue (window over or full)


class MicroBatcher:
    """Coalesces concurrent generate calls of equal (strategy, params, validity_mask)."""

    def __init__(self, generator, executor: Executor | None, window_s: float,
                 max_patients: int, slots: int,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        self.generator = generator
        self.executor = executor
        self.window_s = max(0.0, float(window_s))
        self.max_patients = max(1, int(max_patients))
        self.slots = max(1, int(slots))
        self.on_batch = on_batch  # (requests, patients) per engine call
        self._open: dict[tuple, _Group] = {}
        self._ready: deque[_Group] = deque()
        self._busy = 0

    @property
    def enabled(self) -> bool:
        return self.window_s > 0 and hasattr(self.generator, "generate_batch")

    async def generate(self, demographics: list[tuple[float, str]], strategy: str,
                       params: Any, seed: int, must_include: list[str] | None,
                       validity_mask: bool) -> list:
        """The patients of one request, exactly as ``generator.generate`` would give them."""
        loop = asyncio.get_running_loop()
        if not self.enabled or not demographics:
            if self.on_batch is not None:
                self.on_batch(1, len(demographics))
            cancel = threading.Event()
            try:
                return await loop.run_in_executor(self.executor, lambda: self.generator.generate(
                    demographics, strategy=strategy, params=params, seed=seed,
                    must_include=must_include, validity_mask=validity_mask,
                    should_stop=cancel.is_set))
            except asyncio.CancelledError:
                cancel.set()  # the thread stops at its next engine batch
                raise
        # params: a dict, or the strategy's parsed model (whose str() lists every value)
        key = (strategy, json.dumps(params, sort_keys=True, default=str), bool(validity_mask))
        request = _Request(list(demographics), int(seed), list(must_include or []),
                           loop.create_future())
        group = self._open.get(key)
        if group is None:
            idle = self._busy == 0 and not self._open and not self._ready
            group = _Group(key, strategy, params, bool(validity_mask))
            self._open[key] = group
            if not idle:
                group.timer = loop.call_later(self.window_s, self._window_over, group)
        group.items.append(request)
        group.n_patients += len(request.demographics)
        if group.n_patients >= self.max_patients:
            self._close(group)  # full: no one joins; runs as soon as a slot frees
            self._enqueue(group)
        elif group.timer is None and not group.queued:
            self._enqueue(group)  # the engine was idle: no one to wait for
        try:
            return await request.future
        except asyncio.CancelledError:
            request.cancel.set()
            raise

    # -- scheduling (event loop only) ----------------------------------------------------------
    def _close(self, group: _Group) -> None:
        """No more requests join ``group``."""
        if self._open.get(group.key) is group:
            del self._open[group.key]
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None

    def _enqueue(self, group: _Group) -> None:
        if not group.queued:
            group.queued = True
            self._ready.append(group)
        self._pump()

    def _window_over(self, group: _Group) -> None:
        group.timer = None
        self._enqueue(group)  # stays open (joinable) until a slot takes it

    def _pump(self) -> None:
        while self._busy < self.slots and self._ready:
            group = self._ready.popleft()
            self._close(group)
            self._busy += 1
            asyncio.get_running_loop().create_task(self._run(group))

    async def _run(self, group: _Group) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self.executor, self._call, group)
        except BaseException as err:  # noqa: BLE001 - pool shut down, cancelled: tell everyone
            outcomes = [err] * len(group.items)
        finally:
            self._busy -= 1
            self._pump()
        for request, outcome in zip(group.items, outcomes, strict=True):
            if request.future.done():  # the client went away
                continue
            if isinstance(outcome, asyncio.CancelledError):
                request.future.cancel()
            elif isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    # -- the engine call (inference thread) -----------------------------------------------------
    def _call(self, group: _Group) -> list:
        """Per request: its patients, or the exception it would raise alone."""
        started = time.perf_counter()
        gen = self.generator
        requests = [(r.demographics, r.seed, r.must_include) for r in group.items]
        if self.on_batch is not None:
            self.on_batch(len(requests), group.n_patients)
        items = group.items
        try:
            outcomes: list = gen.generate_batch(
                requests, strategy=group.strategy, params=group.params,
                validity_mask=group.validity_mask,
                should_stop=lambda: all(r.cancel.is_set() for r in items))
        except Exception as err:  # noqa: BLE001
            if len(requests) == 1:
                return [err]
            outcomes = []
            for item, (demographics, seed, must_include) in zip(items, requests, strict=True):
                try:  # each alone: its own answer
                    outcomes.append(gen.generate(
                        demographics, strategy=group.strategy, params=group.params, seed=seed,
                        must_include=must_include or None, validity_mask=group.validity_mask,
                        should_stop=item.cancel.is_set))
                except Exception as one:  # noqa: BLE001
                    outcomes.append(one)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch", extra={"requests": len(requests), "patients": group.n_patients,
                                      "ms": round((time.perf_counter() - started) * 1000, 2)})
        return outcomes
