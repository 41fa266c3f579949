"""Job store: the queue, the jobs' progress and their results, chunk by chunk.

Two implementations of one protocol (:class:`JobStore`):

* :class:`RedisStore` - the deployment store, shared by the API and any number of worker
  processes. Every state change that must not race is one Lua script (atomic in Redis).
* :class:`EmbeddedStore` - in-process dictionaries under a lock, for a single process without
  Redis (the API then runs its worker in a thread).

Semantics both honour:

* a job is a record (strings) plus its result chunks, keyed by chunk index. Writing a chunk that
  is already there overwrites it and does not count it twice, so a chunk re-run after a worker
  died leaves exactly one copy (at-least-once processing, exactly-once results);
* work is handed out chunk by chunk, so every live worker takes chunks of the same cohort:
  ``claim`` leases the next chunk nobody holds (the oldest unfinished job first) to one worker
  and stamps its heartbeat; a lease whose heartbeat is older than ``lease_s`` is taken over by
  the next claim (the worker died or hangs), and the claim says so (``takeover``). A job stays
  on the queue until its last chunk is stored, it is cancelled or it fails;
* a finished job's keys expire after the cache TTL; a cancelled or failed job can be resubmitted;
* ``submit`` may carry a client and a limit: a client with that many unfinished (queued or
  running) jobs gets :class:`TooManyJobs` instead of a new one (checked atomically);
* workers announce themselves (``worker_seen``, every poll and heartbeat); ``live_workers``
  counts those seen within a window, so the API can say when nobody will run a queued job;
* ``retain`` keeps a done job's record and every chunk for at least a grace period, or says
  that a chunk is already gone: a download checks it before its first byte.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from typing import NamedTuple, Protocol

__all__ = [
    "TERMINAL",
    "ChunkLease",
    "EmbeddedStore",
    "JobStore",
    "RedisStore",
    "StoreUnavailable",
    "TooManyJobs",
    "make_store",
]

TERMINAL = ("done", "failed", "cancelled")
RESUBMITTABLE = ("failed", "cancelled")


class StoreUnavailable(RuntimeError):
    """The store cannot be reached."""


class TooManyJobs(RuntimeError):
    """The client already has as many unfinished jobs as it may."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} unfinished cohort jobs")
        self.active = active


class ChunkLease(NamedTuple):
    """One chunk of one job, leased to a worker by :meth:`JobStore.claim`."""

    job_id: str
    index: int
    takeover: bool  # the chunk was leased before and that lease expired


class JobStore(Protocol):
    kind: str

    def ping(self) -> bool: ...
    def submit(self, job_id: str, record: dict[str, str], client: str | None = None,
               max_active: int = 0) -> tuple[dict[str, str], bool]:
        """Create and enqueue ``job_id`` unless a live (or done) one exists; return the record
        and whether it was created. With ``client`` and ``max_active`` > 0, raise
        :class:`TooManyJobs` when creating it would give the client more unfinished jobs."""
    def get(self, job_id: str) -> dict[str, str] | None: ...
    def claim(self, worker: str, now: float, lease_s: float) -> ChunkLease | None:
        """Lease the first chunk of the oldest unfinished job that is neither stored nor held
        under a live lease (a lease older than ``lease_s`` is taken over); None: no work."""
    def heartbeat(self, job_id: str, index: int, worker: str, now: float) -> bool:
        """Renew ``worker``'s lease of a chunk; False when the job is no longer running or
        the lease is gone (chunk stored, job reset) or held by another worker."""
    def chunk_indices(self, job_id: str) -> set[int]: ...
    def put_chunk(self, job_id: str, index: int, payload: bytes, n: int, now: float,
                  ttl: int) -> str:
        """Store one chunk; returns ``"ok"``, ``"done"`` (that was the last one), ``"gone"`` (no
        such job) or the job's status when it is no longer running (``"cancelled"``)."""
    def get_chunk(self, job_id: str, index: int) -> bytes | None: ...
    def fail(self, job_id: str, error: str, now: float, ttl: int) -> None: ...
    def cancel(self, job_id: str, now: float, ttl: int) -> bool: ...
    def queue_length(self) -> int:
        """Unfinished jobs (queued or running): a job stays queued until its last chunk."""
    def worker_seen(self, worker: str, now: float) -> None: ...
    def live_workers(self, now: float, within_s: float) -> int: ...
    def retain(self, job_id: str, n_chunks: int, ttl: int) -> bool:
        """True when every chunk of ``job_id`` is stored; then it and its record stay at least
        ``ttl`` seconds more."""
    def close(self) -> None: ...


# -- Redis ------------------------------------------------------------------------------------

# KEYS: job, chunks, queue, client's jobs, leases. ARGV: id, max_active, prefix, then
# field/value pairs.
_SUBMIT = """
local job = KEYS[1]
local status = redis.call('HGET', job, 'status')
if status and status ~= 'failed' and status ~= 'cancelled' then
  return {0, redis.call('HGETALL', job)}
end
local limit = tonumber(ARGV[2])
if limit > 0 then
  local live = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local s = redis.call('HGET', ARGV[3] .. ':job:' .. id, 'status')
    if s == 'queued' or s == 'running' then live = live + 1
    else redis.call('SREM', KEYS[4], id) end
  end
  if live >= limit then return {2, live} end
  redis.call('SADD', KEYS[4], ARGV[1])
  redis.call('EXPIRE', KEYS[4], 604800)
end
redis.call('DEL', job, KEYS[2], KEYS[5])
for i = 4, #ARGV - 1, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
redis.call('PERSIST', job)
redis.call('LREM', KEYS[3], 0, ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[1])
return {1, redis.call('HGETALL', job)}
"""
# KEYS: job, chunks. ARGV: n_chunks, ttl.
_RETAIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HLEN', KEYS[2]) < tonumber(ARGV[1]) then return 0 end
for _, key in ipairs(KEYS) do
  local left = redis.call('TTL', key)
  if left >= 0 and left < tonumber(ARGV[2]) then redis.call('EXPIRE', key, ARGV[2]) end
end
return 1
"""
# A lease is the hash field <chunk index> = "<heartbeat>|<worker>" in <job>:leases; it is
# deleted when the chunk is stored, so the hash holds the chunks in flight only. The job's
# ``cursor`` is the first chunk never leased: fresh chunks come from it in O(1), and only once
# every chunk was handed out are the (few) leases in flight scanned for an expired one.
# KEYS: queue. ARGV: worker, now, lease_s, prefix.
_CLAIM = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local now, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = #ids, 1, -1 do
  local id = ids[i]
  local job = ARGV[4] .. ':job:' .. id
  local status = redis.call('HGET', job, 'status')
  if status ~= 'queued' and status ~= 'running' then
    redis.call('LREM', KEYS[1], 0, id)
  else
    local chunks, leases = job .. ':chunks', job .. ':leases'
    local n = tonumber(redis.call('HGET', job, 'n_chunks'))
    local cursor = tonumber(redis.call('HGET', job, 'cursor') or '0') or 0
    local index, takeover = nil, 0
    while cursor < n and not index do
      if redis.call('HEXISTS', chunks, cursor) == 0 then index = cursor end
      cursor = cursor + 1
    end
    redis.call('HSET', job, 'cursor', cursor)
    if not index then
      local flat = redis.call('HGETALL', leases)
      for j = 1, #flat, 2 do
        local v = flat[j + 1]
        local bar = string.find(v, '|', 1, true)
        local beat = tonumber(string.sub(v, 1, bar - 1)) or 0
        if now - beat > lease and redis.call('HEXISTS', chunks, flat[j]) == 0 then
          index, takeover = tonumber(flat[j]), 1
          break
        end
      end
    end
    if index then
      redis.call('HSET', leases, index, ARGV[2] .. '|' .. ARGV[1])
      if status == 'queued' then
        redis.call('HSET', job, 'status', 'running', 'started_at', ARGV[2])
        redis.call('HINCRBY', job, 'attempts', 1)
      end
      if takeover == 1 then redis.call('HINCRBY', job, 'attempts', 1) end
      redis.call('HSET', job, 'worker', ARGV[1], 'heartbeat', ARGV[2])
      return {id, index, takeover}
    end
  end
end
return false
"""
# KEYS: job, leases. ARGV: index, worker, now.
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 0 end
local bar = string.find(v, '|', 1, true)
if string.sub(v, bar + 1) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. '|' .. ARGV[2])
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[3])
return 1
"""
# KEYS: job, chunks, queue, leases. ARGV: index, payload, n, now, ttl, id.
_PUT_CHUNK = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'gone' end
if status ~= 'running' then return status end
if redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'done', ARGV[3])
end
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('HLEN', KEYS[2]) >= tonumber(redis.call('HGET', KEYS[1], 'n_chunks')) then
  redis.call('HSET', KEYS[1], 'status', 'done', 'finished_at', ARGV[4])
  redis.call('LREM', KEYS[3], 0, ARGV[6])
  redis.call('DEL', KEYS[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  return 'done'
end
return 'ok'
"""
# KEYS: job, chunks, queue, leases. ARGV: status, error, now, ttl, id.
_END = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'done' or status == 'failed' or status == 'cancelled' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'error', ARGV[2], 'finished_at', ARGV[3])
redis.call('LREM', KEYS[3], 0, ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[2], KEYS[4])
return 1
"""


def _pairs(flat: list) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStore:
    """The store in Redis, under ``<prefix>:`` keys."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "synthehr") -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=2, health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self.queue_key = f"{prefix}:queue"
        self.workers_key = f"{prefix}:workers"
        self._submit = self.client.register_script(_SUBMIT)
        self._claim = self.client.register_script(_CLAIM)
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._put_chunk = self.client.register_script(_PUT_CHUNK)
        self._end = self.client.register_script(_END)
        self._retain = self.client.register_script(_RETAIN)

    @property
    def connection_errors(self) -> tuple[type[Exception], ...]:
        return self._errors

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _chunks(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:chunks"

    def _leases(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:leases"

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False

    def submit(self, job_id: str, record: dict[str, str], client: str | None = None,
               max_active: int = 0) -> tuple[dict[str, str], bool]:
        args: list[str] = [job_id, str(max_active if client else 0), self.prefix]
        for key, value in record.items():
            args += [key, str(value)]
        created, flat = self._submit(
            keys=[self._job(job_id), self._chunks(job_id), self.queue_key,
                  self._client(client or ""), self._leases(job_id)], args=args)
        if created == 2:
            raise TooManyJobs(int(flat))
        return _pairs(flat), bool(created)

    def _client(self, client: str) -> str:
        return f"{self.prefix}:client:{hashlib.sha256(client.encode()).hexdigest()[:24]}"

    def worker_seen(self, worker: str, now: float) -> None:
        self.client.zadd(self.workers_key, {worker: now})

    def live_workers(self, now: float, within_s: float) -> int:
        # Entries long dead are dropped here, so the set stays the size of the fleet.
        self.client.zremrangebyscore(self.workers_key, "-inf", now - max(3600.0, within_s))
        return int(self.client.zcount(self.workers_key, now - within_s, "+inf"))

    def retain(self, job_id: str, n_chunks: int, ttl: int) -> bool:
        return bool(self._retain(keys=[self._job(job_id), self._chunks(job_id)],
                                 args=[n_chunks, ttl]))

    def get(self, job_id: str) -> dict[str, str] | None:
        data = self.client.hgetall(self._job(job_id))
        return {_s(k): _s(v) for k, v in data.items()} or None

    def claim(self, worker: str, now: float, lease_s: float) -> ChunkLease | None:
        out = self._claim(keys=[self.queue_key],
                          args=[worker, repr(now), repr(lease_s), self.prefix])
        if not out:
            return None
        return ChunkLease(_s(out[0]), int(out[1]), bool(int(out[2])))

    def heartbeat(self, job_id: str, index: int, worker: str, now: float) -> bool:
        return bool(self._heartbeat(keys=[self._job(job_id), self._leases(job_id)],
                                    args=[index, worker, repr(now)]))

    def chunk_indices(self, job_id: str) -> set[int]:
        return {int(k) for k in self.client.hkeys(self._chunks(job_id))}

    def put_chunk(self, job_id: str, index: int, payload: bytes, n: int, now: float,
                  ttl: int) -> str:
        return _s(self._put_chunk(
            keys=[self._job(job_id), self._chunks(job_id), self.queue_key,
                  self._leases(job_id)],
            args=[index, payload, n, repr(now), ttl, job_id]))

    def get_chunk(self, job_id: str, index: int) -> bytes | None:
        return self.client.hget(self._chunks(job_id), str(index))

    def _finish(self, job_id: str, status: str, error: str, now: float, ttl: int) -> bool:
        return bool(self._end(
            keys=[self._job(job_id), self._chunks(job_id), self.queue_key,
                  self._leases(job_id)],
            args=[status, error, repr(now), ttl, job_id]))

    def fail(self, job_id: str, error: str, now: float, ttl: int) -> None:
        self._finish(job_id, "failed", error, now, ttl)

    def cancel(self, job_id: str, now: float, ttl: int) -> bool:
        return self._finish(job_id, "cancelled", "cancelled by request", now, ttl)

    def queue_length(self) -> int:
        return int(self.client.llen(self.queue_key))

    def close(self) -> None:
        self.client.close()


# -- embedded ---------------------------------------------------------------------------------

class EmbeddedStore:
    """The same store in this process's memory (no Redis): one process, jobs die with it."""

    kind = "embedded"
    connection_errors: tuple[type[Exception], ...] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, str]] = {}
        self._chunks: dict[str, dict[int, bytes]] = {}
        self._expiry: dict[str, float] = {}
        self._queue: deque[str] = deque()  # newest left, oldest right (as Redis LPUSH)
        self._leases: dict[str, dict[int, tuple[float, str]]] = {}  # job -> index -> (beat, w)
        self._clients: dict[str, set[str]] = {}
        self._workers: dict[str, float] = {}

    def _expire(self) -> None:
        now = time.time()
        for job_id in [j for j, t in self._expiry.items() if t <= now]:
            self._jobs.pop(job_id, None)
            self._chunks.pop(job_id, None)
            self._leases.pop(job_id, None)
            self._expiry.pop(job_id, None)

    def ping(self) -> bool:
        return True

    def submit(self, job_id: str, record: dict[str, str], client: str | None = None,
               max_active: int = 0) -> tuple[dict[str, str], bool]:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
            if job is not None and job["status"] not in RESUBMITTABLE:
                return dict(job), False
            if client and max_active > 0:
                mine = self._clients.setdefault(client, set())
                mine &= {j for j in mine
                         if self._jobs.get(j, {}).get("status") in ("queued", "running")}
                if len(mine) >= max_active:
                    raise TooManyJobs(len(mine))
                mine.add(job_id)
            self._jobs[job_id] = {k: str(v) for k, v in record.items()}
            self._chunks[job_id] = {}
            self._leases[job_id] = {}
            self._expiry.pop(job_id, None)
            if job_id in self._queue:
                self._queue.remove(job_id)
            self._queue.appendleft(job_id)
            return dict(self._jobs[job_id]), True

    def get(self, job_id: str) -> dict[str, str] | None:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
            return dict(job) if job else None

    def claim(self, worker: str, now: float, lease_s: float) -> ChunkLease | None:
        with self._lock:
            for job_id in reversed(list(self._queue)):  # oldest first
                job = self._jobs.get(job_id)
                if job is None or job["status"] not in ("queued", "running"):
                    self._queue.remove(job_id)
                    continue
                chunks, leases = self._chunks[job_id], self._leases.setdefault(job_id, {})
                n, cursor = int(job["n_chunks"]), int(job.get("cursor") or 0)
                index, takeover = None, False
                while cursor < n and index is None:
                    if cursor not in chunks:
                        index = cursor
                    cursor += 1
                job["cursor"] = str(cursor)
                if index is None:
                    for i, (beat, _) in leases.items():
                        if now - beat > lease_s and i not in chunks:
                            index, takeover = i, True
                            break
                if index is None:
                    continue
                leases[index] = (now, worker)
                if job["status"] == "queued":
                    job.update(status="running", started_at=repr(now))
                    job["attempts"] = str(int(job.get("attempts") or 0) + 1)
                if takeover:
                    job["attempts"] = str(int(job.get("attempts") or 0) + 1)
                job.update(worker=worker, heartbeat=repr(now))
                return ChunkLease(job_id, index, takeover)
            return None

    def heartbeat(self, job_id: str, index: int, worker: str, now: float) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            lease = self._leases.get(job_id, {}).get(index)
            if job and job["status"] == "running" and lease and lease[1] == worker:
                self._leases[job_id][index] = (now, worker)
                job["heartbeat"] = repr(now)
                return True
            return False

    def chunk_indices(self, job_id: str) -> set[int]:
        with self._lock:
            return set(self._chunks.get(job_id, {}))

    def put_chunk(self, job_id: str, index: int, payload: bytes, n: int, now: float,
                  ttl: int) -> str:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return "gone"
            if job["status"] != "running":
                return job["status"]
            chunks = self._chunks.setdefault(job_id, {})
            if index not in chunks:
                job["done"] = str(int(job.get("done", "0")) + n)
            chunks[index] = bytes(payload)
            self._leases.get(job_id, {}).pop(index, None)
            if len(chunks) >= int(job["n_chunks"]):
                job.update(status="done", finished_at=repr(now))
                if job_id in self._queue:
                    self._queue.remove(job_id)
                self._leases.pop(job_id, None)
                self._expiry[job_id] = time.time() + ttl
                return "done"
            return "ok"

    def get_chunk(self, job_id: str, index: int) -> bytes | None:
        with self._lock:
            return self._chunks.get(job_id, {}).get(index)

    def _finish(self, job_id: str, status: str, error: str, now: float, ttl: int) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["status"] in TERMINAL:
                return False
            job.update(status=status, error=error, finished_at=repr(now))
            if job_id in self._queue:
                self._queue.remove(job_id)
            self._chunks[job_id] = {}
            self._leases.pop(job_id, None)
            self._expiry[job_id] = time.time() + ttl
            return True

    def fail(self, job_id: str, error: str, now: float, ttl: int) -> None:
        self._finish(job_id, "failed", error, now, ttl)

    def cancel(self, job_id: str, now: float, ttl: int) -> bool:
        return self._finish(job_id, "cancelled", "cancelled by request", now, ttl)

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)

    def worker_seen(self, worker: str, now: float) -> None:
        with self._lock:
            self._workers[worker] = now

    def live_workers(self, now: float, within_s: float) -> int:
        with self._lock:
            return sum(now - seen <= within_s for seen in self._workers.values())

    def retain(self, job_id: str, n_chunks: int, ttl: int) -> bool:
        with self._lock:
            self._expire()
            if job_id not in self._jobs or len(self._chunks.get(job_id, {})) < n_chunks:
                return False
            if job_id in self._expiry:
                self._expiry[job_id] = max(self._expiry[job_id], time.time() + ttl)
            return True

    def close(self) -> None:
        pass


def make_store(redis_url: str | None, prefix: str = "synthehr") -> JobStore:
    """:class:`RedisStore` for a URL, :class:`EmbeddedStore` for None."""
    return RedisStore(redis_url, prefix) if redis_url else EmbeddedStore()


def dumps(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))
