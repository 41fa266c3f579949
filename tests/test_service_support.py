"""Shared helpers of the service tests (imported by tests/test_service*.py, test_jobs*.py,
test_deploy*.py): a small real bundle, generators over the real engine, a private Redis.

The bundle is built once per session from the project's own trainer (``synthehr train --preset
demo --size tiny``, one short epoch, ONNX export) into a cache folder, so the service tests run
the same code as production: bundle loading, ONNX Runtime graphs, the numpy decoding engine.
Where the trainer cannot produce an ONNX bundle (torch missing, export not available), the
service tests fail with the reason, never quietly switching to another model: set
``SYNTHEHR_TEST_RANDOM_MODEL=1`` to run them over the real :class:`app.decoding.engine.Engine`
with an untrained :class:`~app.decoding.model_api.RandomStepModel` instead (said on stderr).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _data_key() -> str:
    """Hash of the files that shape the simulated demo data (the simulator, the MCE edits and
    the CMS tables): a cached bundle trained on older data is not reused, since the evaluation
    refuses a bundle whose data changed."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([ROOT / "training" / "simulate.py", ROOT / "app" / "icd9" / "edits.py",
                        *(ROOT / "app" / "icd9" / "data").glob("*.txt")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


BUNDLE_CACHE = Path(os.environ.get(
    "SYNTHEHR_TEST_BUNDLE_DIR",
    ROOT / ".pytest_cache" / "synthehr-bundles" / f"tiny-demo-{_data_key()}"))
_BUILD_ERROR: list[str] = []


def _bundle_usable(path: Path) -> bool:
    try:
        from app.runtime.generators import BundleGenerator

        BundleGenerator(path)
        return True
    except Exception as err:  # noqa: BLE001
        _BUILD_ERROR[:] = [f"{type(err).__name__}: {err}"]
        return False


def tiny_bundle() -> Path | None:
    """A small real bundle (trained for seconds on the demo simulation), or None."""
    if (BUNDLE_CACHE / "manifest.json").is_file() and _bundle_usable(BUNDLE_CACHE):
        return BUNDLE_CACHE
    if os.environ.get("SYNTHEHR_TEST_NO_TRAIN"):
        _BUILD_ERROR[:] = ["training disabled (SYNTHEHR_TEST_NO_TRAIN)"]
        return None
    try:
        import torch  # noqa: F401

        from training.cli.train import run_train
    except Exception as err:  # noqa: BLE001 - serving-only environment
        _BUILD_ERROR[:] = [f"no trainer here: {err}"]
        return None
    if BUNDLE_CACHE.exists():
        shutil.rmtree(BUNDLE_CACHE)
    try:
        run_train(out=BUNDLE_CACHE, source=None, data=None, preset="demo", size="tiny",
                  overrides={"train.max_train_patients": 600}, epochs=1, batch_size=64,
                  seed=0, threads=1, progress=False, force=True, export=True)
    except Exception as err:  # noqa: BLE001
        _BUILD_ERROR[:] = [f"training failed: {type(err).__name__}: {err}"]
        return None
    return BUNDLE_CACHE if _bundle_usable(BUNDLE_CACHE) else None


def random_engine_generator(seed: int = 0):
    """The real engine over an untrained random step model and a 300-code vocabulary."""
    from app.decoding.engine import Engine
    from app.decoding.model_api import RandomStepModel
    from app.icd9.codes import category_of
    from app.icd9.hierarchy import load_hierarchy
    from app.runtime.generators import EngineGenerator
    from app.vocab import Vocabulary

    codes = sorted(load_hierarchy().billable_codes[::47])[:300] + ["25000", "4019"]
    codes = sorted(set(codes))
    vocab = Vocabulary(codes, np.ones(len(codes), dtype=np.int64),
                       sorted({category_of(c) for c in codes}))
    import scipy.sparse as sp

    from app.decoding.strategies import CooccurrenceStats

    n = len(codes)
    pairs = sp.random(n, n, density=0.02, random_state=seed, format="csr") * 10
    pairs = sp.csr_matrix(pairs + pairs.T).astype(np.float64)
    pairs.data = np.ceil(pairs.data)
    stats = CooccurrenceStats(pairs, np.full(n, 20.0), n_visits=500, n_special=vocab.n_special)
    engine = Engine(RandomStepModel(len(vocab), seed=seed), vocab, cooccurrence=stats,
                    max_visits=4, max_codes_per_visit=6, max_length=48)
    manifest = {"format": "synthehr-bundle", "name": "random-test", "model": {"d_model": 0}}
    return EngineGenerator(engine, manifest, "random-test-000000000000",
                           {"note": "untrained random step model"})


_GENERATOR = []


RANDOM_MODEL_ENV = "SYNTHEHR_TEST_RANDOM_MODEL"


def session_generator():
    """The real bundle's generator; the untrained random-model engine only when asked for
    (``SYNTHEHR_TEST_RANDOM_MODEL=1``). Without a bundle and without that opt-in it raises
    with the reason the bundle could not be built."""
    if not _GENERATOR:
        if os.environ.get(RANDOM_MODEL_ENV) == "1":
            print(f"[service tests] {RANDOM_MODEL_ENV}=1: the engine over an untrained "
                  "RandomStepModel, not a trained bundle", file=sys.stderr)
            _GENERATOR.append(random_engine_generator())
            return _GENERATOR[0]
        path = tiny_bundle()
        if path is None:
            raise RuntimeError(
                f"no test bundle could be built ({'; '.join(_BUILD_ERROR) or 'unknown'}); "
                f"install the train extra, or set {RANDOM_MODEL_ENV}=1 to run the service "
                "tests over an untrained random model")
        from app.runtime.generators import BundleGenerator

        _GENERATOR.append(BundleGenerator(path))
    return _GENERATOR[0]


class SlowGenerator:
    """Wraps a generator, sleeping ``delay`` seconds per call (to observe running jobs)."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.bundle_version = inner.bundle_version
        self.manifest, self.evaluation = inner.manifest, inner.evaluation
        self.strategies = inner.strategies

    def has_code(self, code: str) -> bool:
        return self.inner.has_code(code)

    def generate(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.generate(*args, **kwargs)


# -- Redis --------------------------------------------------------------------------------------

MAIN_REDIS = os.environ.get("SYNTHEHR_TEST_REDIS", "redis://127.0.0.1:6379/0")


def redis_or_skip(url: str = MAIN_REDIS):
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no Redis at {url} ({err}); scripts/test.sh starts one")
    return client


def unique_prefix(name: str) -> str:
    return f"synthehr-test:{name}:{os.getpid()}:{time.time_ns()}"


def delete_prefix(client, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        client.delete(*keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own on a spare port (for fault tests), stopped by its pid."""

    def __init__(self, folder: Path, persistent: bool = True) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.folder = folder
        self.port = free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--save", "", "--daemonize", "no",
                "--logfile", str(self.folder / "redis.log")]
        args += (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                 else ["--appendonly", "no"])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except Exception:  # noqa: BLE001
                time.sleep(0.05)
        raise RuntimeError(f"private redis on port {self.port} did not start")

    def stop(self, hard: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_until_ready(base: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Poll ``base/ready`` until it answers 200; fail with the server's output if it exits."""
    import httpx

    def ready() -> bool:
        if proc.poll() is not None:
            stream = proc.stdout or proc.stderr
            output = stream.read().decode()[-3000:] if stream else ""
            raise AssertionError(f"server exited with code {proc.returncode}: {output}")
        try:
            return httpx.get(f"{base}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, interval=0.1, what=f"{base}/ready")


def worker_main() -> None:
    """``python tests/test_service_support.py``: a cohort worker process over the session's
    generator (bundle or random engine), slowed by ``SYNTHEHR_TEST_DELAY`` seconds per engine
    call so a test can kill it mid-job. Same Worker and RedisStore as ``synthehr worker``."""
    import threading

    from app.service.logs import configure_logging
    from app.service.store import RedisStore
    from app.service.worker import Worker
    from app.settings import Settings

    settings = Settings()
    configure_logging("INFO", True)
    gen = session_generator()
    delay = float(os.environ.get("SYNTHEHR_TEST_DELAY", "0"))
    if delay:
        gen = SlowGenerator(gen, delay)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Worker(RedisStore(settings.redis_url, settings.key_prefix), gen, settings).run(stop)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker_main()
