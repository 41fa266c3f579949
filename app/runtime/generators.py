"""A loaded bundle and its decoding engine: the generators the generation service drives.

:class:`BundleGenerator` loads a runtime bundle (:mod:`app.bundle`), builds the numpy decoding
engine over its ONNX Runtime graphs (:mod:`app.decoding.engine`) and adds the bundle's identity:
``manifest`` and ``evaluation`` (both without training records or paths), ``bundle_version``,
``strategies``, ``has_code`` and ``check_target``. ``generate`` decodes one request's rows and
``generate_batch`` the rows of several requests in one engine call (for the micro-batching
queue, :mod:`app.runtime.batcher`). Only :mod:`app.runtime.generation` calls them in the
running system; nothing outside :mod:`app.runtime` imports the engine, so an engine change is
absorbed here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from app.corpus import Patient
from app.runtime.redact import public_value

if TYPE_CHECKING:
    from app.decoding.params import PlainParams

__all__ = ["BundleGenerator", "EngineGenerator", "GenerationStopped", "Generator",
           "load_generator"]

log = logging.getLogger("synthehr.generation")


class GenerationStopped(RuntimeError):
    """The caller asked the generation to stop (its client left, or its time ran out)."""


StopCheck = Callable[[], bool]


class Generator(Protocol):
    bundle_version: str
    manifest: dict[str, Any]
    evaluation: dict[str, Any] | None
    strategies: list[str]

    def generate(self, demographics: list[tuple[float, str]], strategy: str = "plain",
                 params: PlainParams | dict[str, Any] | None = None, seed: int = 0,
                 must_include: list[str] | None = None,
                 validity_mask: bool = True, *, first_index: int = 0,
                 should_stop: StopCheck | None = None) -> list[Patient]: ...

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
    """``obj`` without training records, with every filesystem path reduced to its name and
    non-finite numbers as None."""

    def drop(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop(v) for k, v in value.items() if k not in _PRIVATE_KEYS}
        if isinstance(value, list):
            return [drop(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None  # a metric that came out NaN: JSON cannot carry it
        return value

    return public_value(drop(obj))


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

        self.unavailable: dict[str, str] = dict(getattr(engine, "unavailable", None) or {})
        self.strategies = [s for s in STRATEGIES
                           if (s != "retrieve_edit" or getattr(engine, "retrieval", None))
                           and s not in self.unavailable]
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
                 params: PlainParams | dict[str, Any] | None = None, seed: int = 0,
                 must_include: list[str] | None = None,
                 validity_mask: bool = True, *, first_index: int = 0,
                 should_stop: StopCheck | None = None, any_of: list[str] | None = None,
                 exclude: list[str] | None = None) -> list[Patient]:
        """One request's patients. Patient ``i`` is decoded as patient ``first_index + i`` of
        the request ``seed`` (a cohort chunk passes its first patient's number, so its bytes
        do not depend on where chunks start). ``should_stop`` is asked between engine calls;
        when it says yes, :class:`GenerationStopped` is raised and no more rows are decoded.
        ``any_of`` and ``exclude`` target the cohort (:mod:`app.decoding.targeting`)."""
        rows = [(item, int(seed), first_index + i, list(must_include or []))
                for i, item in enumerate(demographics)]
        if not rows:
            return []
        if any_of or exclude:
            targeting = self.targeting
            excluded = targeting.expand(exclude or [], "exclude")
            codes = targeting.expand(any_of or [], "any_of")
            # A required code of the list already satisfies any_of.
            if codes and not set(codes) & set(must_include or []):
                return targeting.sample_any_of(
                    self.engine, [r[0] for r in rows], codes, strategy=strategy,
                    params=params, seed=int(seed), must_include=list(must_include or []),
                    exclude=excluded, validity_mask=validity_mask,
                    row_seeds=[r[1] for r in rows], row_indices=[r[2] for r in rows],
                    should_stop=should_stop, stopped=GenerationStopped,
                    step=self._slice_patients(strategy, params))
            return self._rows(rows, strategy, params, validity_mask, should_stop,
                              exclude=excluded)
        return self._rows(rows, strategy, params, validity_mask, should_stop)

    def generate_batch(self, requests: list[tuple[list[tuple[float, str]], int, list[str] | None]],
                       strategy: str = "plain", params: PlainParams | dict[str, Any] | None = None,
                       validity_mask: bool = True, *,
                       should_stop: StopCheck | None = None) -> list[list[Patient]]:
        """Several requests ``(demographics, seed, must_include)`` of one strategy, params and
        validity flag as one engine call; per request the patients :meth:`generate` gives it.

        Each row is keyed on its own request's seed and its index within that request, and
        carries its own request's ``must_include``. An error fails the whole call (the caller
        re-runs the requests one by one to tell which one is at fault).
        """
        rows = [(item, int(seed), i, list(must_include or []))
                for demo, seed, must_include in requests for i, item in enumerate(demo)]
        patients = self._rows(rows, strategy, params, validity_mask, should_stop)
        out, start = [], 0
        for demo, _, _ in requests:
            out.append(patients[start:start + len(demo)])
            start += len(demo)
        return out

    def _slice_patients(self, strategy: str, params: PlainParams | dict[str, Any] | None) -> int:
        """Patients per engine call: one engine batch of decoded rows. The engine cuts a call
        into batches of this many patients anyway, so slicing here changes no batch's
        composition; it only lets a stop request take effect between batches."""
        batch = int(getattr(self.engine, "batch_size", 64) or 64)
        if strategy == "rerank":
            from app.decoding.params import parse_params

            batch //= parse_params(strategy, params).candidates  # type: ignore[attr-defined]
        return max(1, batch)

    def _rows(self, rows: list[tuple[tuple[float, str], int, int, list[str]]], strategy: str,
              params: PlainParams | dict[str, Any] | None, validity_mask: bool,
              should_stop: StopCheck | None, exclude: list[str] | None = None) -> list[Patient]:
        """Decode ``(demographics, seed, index, must_include)`` rows, an engine batch at a
        time when ``should_stop`` is given (else in one call); ``exclude``: codes never
        generated."""
        step = self._slice_patients(strategy, params) if should_stop is not None else len(rows)
        out: list[Patient] = []
        for lo in range(0, len(rows), max(1, step)):
            if should_stop is not None and should_stop():
                raise GenerationStopped(f"stopped after {lo} of {len(rows)} patients")
            part = rows[lo:lo + step]
            required = [r[3] for r in part]
            result = self.engine.generate(
                [r[0] for r in part], strategy=strategy, params=params or {}, seed=part[0][1],
                must_include=required if any(required) else None,
                validity_mask=validity_mask, row_seeds=[r[1] for r in part],
                row_indices=[r[2] for r in part],
                **({"exclude": exclude} if exclude else {}))
            out.extend(result.patients)
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
