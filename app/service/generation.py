"""The service's one door to the generation engine.

:class:`BundleGenerator` loads a runtime bundle (:mod:`app.bundle`), builds the numpy decoding
engine over its ONNX Runtime graphs (:mod:`app.decoding.engine`) and exposes exactly what the
routes and the worker need: ``generate(demographics, strategy, params, seed, must_include,
validity_mask) -> list[Patient]``, ``generate_batch`` (several requests' rows in one engine
call, for :mod:`app.service.batcher`), ``manifest``, ``evaluation``, ``bundle_version`` and
``has_code``. Nothing else in :mod:`app.service` imports the engine, so an engine change is
absorbed here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from app.corpus import Patient

__all__ = ["BundleGenerator", "EngineGenerator", "GenerationUnavailable", "Generator", "load_generator"]

log = logging.getLogger("synthehr.generation")


class GenerationUnavailable(RuntimeError):
    """No bundle is loaded (missing, refused, or still loading)."""


class Generator(Protocol):
    bundle_version: str
    manifest: dict[str, Any]
    evaluation: dict[str, Any] | None
    strategies: list[str]

    def generate(self, demographics: list[tuple[float, str]], strategy: str = "plain",
                 params: dict[str, Any] | None = None, seed: int = 0,
                 must_include: list[str] | None = None,
                 validity_mask: bool = True) -> list[Patient]: ...

    def has_code(self, code: str) -> bool: ...


def bundle_version_of(path: Path, manifest: dict[str, Any]) -> str:
    """``<bundle name>-<first 12 hex of the manifest's SHA-256>``: the manifest lists every
    file's checksum, so this changes whenever any byte of the bundle does."""
    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()[:12]
    name = manifest.get("name") or path.resolve().name
    return f"{name}-{digest}"


# Manifest keys that could carry training records or paths of the training data: never served.
_PRIVATE_KEYS = {"train_index", "patients", "records", "examples", "data_path", "source_path"}


def _public(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if k not in _PRIVATE_KEYS}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    return obj


class EngineGenerator:
    """A decoding engine (:class:`app.decoding.engine.Engine`) with its bundle's identity."""

    def __init__(self, engine, manifest: dict[str, Any], bundle_version: str,
                 evaluation: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.manifest: dict[str, Any] = _public(manifest)
        self.bundle_version = bundle_version
        self.evaluation = _public(evaluation) if evaluation else None
        # quantiles of stays and gaps for dating visits (app.dating); None: the default scheme
        self.visit_intervals: dict[str, Any] | None = None
        from app.decoding.params import STRATEGIES

        self.strategies = [s for s in STRATEGIES
                           if s != "retrieve_edit" or getattr(engine, "retrieval", None)]
        self._codes = set(engine.vocab.codes)
        self._targeting = None

    def has_code(self, code: str) -> bool:
        return code in self._codes

    @property
    def targeting(self):
        """``any_of``/``exclude`` over this bundle's vocabulary (app.decoding.targeting)."""
        if self._targeting is None:
            from app.decoding.targeting import Targeting

            self._targeting = Targeting(self.engine.vocab, self.engine.validity)
        return self._targeting

    def check_target(self, ages: list[int], sexes: list[str], must_include: list[str],
                     any_of: list[str], exclude: list[str], validity_mask: bool) -> None:
        """Refuse (``TargetError`` naming the field) a targeting spec some patient of the
        given whole-year ages and sexes could not meet; nothing is decoded."""
        targeting = self.targeting
        targeting.check(ages, sexes, must_include, targeting.expand(any_of, "any_of"),
                        targeting.expand(exclude, "exclude"), validity_mask)

    def generate(self, demographics: list[tuple[float, str]], strategy: str = "plain",
                 params: dict[str, Any] | None = None, seed: int = 0,
                 must_include: list[str] | None = None,
                 validity_mask: bool = True, any_of: list[str] | None = None,
                 exclude: list[str] | None = None) -> list[Patient]:
        if not demographics:
            return []
        required: list[Any] | None = list(must_include or []) or None
        excluded: list[str] | None = None
        if any_of or exclude:
            targeting = self.targeting
            excluded = targeting.expand(exclude or [], "exclude") or None
            codes = targeting.expand(any_of or [], "any_of")
            # A required code of the list already satisfies any_of.
            if codes and not set(codes) & set(required or []):
                return targeting.sample_any_of(
                    self.engine, list(demographics), codes, strategy=strategy, params=params,
                    seed=int(seed), must_include=required or [], exclude=excluded or [],
                    validity_mask=validity_mask)
        result = self.engine.generate(list(demographics), strategy=strategy,
                                      params=params or {}, seed=int(seed),
                                      must_include=required, validity_mask=validity_mask,
                                      **({"exclude": excluded} if excluded else {}))
        return list(result.patients)

    def generate_batch(self, requests: list[tuple[list[tuple[float, str]], int, list[str] | None]],
                       strategy: str = "plain", params: dict[str, Any] | None = None,
                       validity_mask: bool = True) -> list[list[Patient]]:
        """Several requests ``(demographics, seed, must_include)`` of one strategy, params and
        validity flag as one engine call; per request the patients :meth:`generate` gives it.

        Each row is keyed on its own request's seed and its index within that request, and
        carries its own request's ``must_include``. An error fails the whole call (the caller
        re-runs the requests one by one to tell which one is at fault).
        """
        demographics: list[tuple[float, str]] = []
        seeds: list[int] = []
        indices: list[int] = []
        required: list[list[str]] = []
        for demo, seed, must_include in requests:
            codes = list(must_include or [])
            for i, item in enumerate(demo):
                demographics.append(item)
                seeds.append(int(seed))
                indices.append(i)
                required.append(codes)
        if not demographics:
            return [[] for _ in requests]
        result = self.engine.generate(demographics, strategy=strategy, params=params or {},
                                      seed=seeds[0],
                                      must_include=required if any(required) else None,
                                      validity_mask=validity_mask, row_seeds=seeds,
                                      row_indices=indices)
        out, start = [], 0
        for demo, _, _ in requests:
            out.append(list(result.patients[start:start + len(demo)]))
            start += len(demo)
        return out


def _evaluation(path: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("evaluation", "metrics", "training_metrics"):
        if isinstance(manifest.get(key), dict):
            return manifest[key]
    file = path / "evaluation.json"
    if file.is_file():
        try:
            return json.loads(file.read_text())
        except ValueError:
            log.warning("evaluation.json of the bundle is not valid JSON; ignored")
    return None


class BundleGenerator(EngineGenerator):
    """A bundle folder loaded (format and checksums verified) with its ONNX Runtime engine."""

    def __init__(self, bundle_dir: str | Path, ort_threads: int = 1) -> None:
        from app.bundle import load_bundle

        self.path = Path(bundle_dir)
        self.bundle = load_bundle(self.path)
        engine = _engine_for(self.bundle, ort_threads)
        super().__init__(engine, self.bundle.manifest,
                         bundle_version_of(self.path, self.bundle.manifest),
                         _evaluation(self.path, self.bundle.manifest))
        self.visit_intervals = self.bundle.reference_stats.get("visit_intervals")


def _engine_for(bundle, ort_threads: int):
    """The engine over a bundle's ONNX graphs (limits and statistics from the bundle)."""
    from app.decoding.engine import Engine

    return Engine.from_bundle(bundle, intra_op_threads=ort_threads)


def load_generator(bundle_dir: str | Path, ort_threads: int = 1) -> BundleGenerator:
    return BundleGenerator(bundle_dir, ort_threads=ort_threads)
