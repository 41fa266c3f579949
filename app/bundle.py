"""Reading a model bundle (``models/<name>/``) on the serving side: no torch here.

A bundle is a folder with ``manifest.json`` (``format``, ``format_version``, model config, data
source and content hash, split sizes, training metrics, creation time, and ``files``: name ->
SHA-256 of every other file) and the files it lists: ``config.json``, ``model.safetensors``,
``vocab.json``, ``cooccurrence.npz``, ``reference_stats.json``, ``train_index.json.gz`` and,
once exported, ``encoder.onnx`` / ``decoder.onnx``. :func:`load_bundle` refuses a bundle whose
format version differs or whose files are missing or altered, naming the file and the reason.
See ``models/README.md`` for the format.

:func:`reference_stats` (the statistics of the training split stored in a bundle) lives here so
that the service can compute the same statistics for generated patients.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from app.cooccurrence import load_cooccurrence
from app.corpus import SEXES, Patient
from app.dating import interval_stats
from app.vocab import Vocabulary

__all__ = [
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "REQUIRED_FILES",
    "Bundle",
    "BundleError",
    "is_dp_bundle",
    "load_bundle",
    "load_train_index",
    "read_manifest",
    "reference_stats",
    "sha256_file",
    "verify_bundle",
]

BUNDLE_FORMAT = "synthehr-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "vocab.json", "cooccurrence.npz",
                  "reference_stats.json")


class BundleError(ValueError):
    """A bundle that cannot be used; the message says which file and why."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """The parsed manifest, after checking its format tag and version."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir}: not a folder")
    if not path.is_file():
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is missing (is this a bundle, or "
                          f"did training not finish?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is not valid JSON ({err})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} format is "
                          f"{manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle {bundle_dir}: format version {version!r}, this version of "
                          f"synthehr reads version {FORMAT_VERSION}; retrain or re-export it")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} has no 'files' checksum map")
    return manifest


def is_dp_bundle(manifest: dict[str, Any]) -> bool:
    """Whether the manifest records differential-privacy training."""
    return bool((manifest.get("privacy") or {}).get("differential_privacy"))


def verify_bundle(bundle_dir: str | Path, manifest: dict[str, Any] | None = None,
                  required: Iterable[str] = REQUIRED_FILES) -> dict[str, Any]:
    """Check every listed file's SHA-256 and that the required files are listed (a DP
    bundle has no co-occurrence matrix by design)."""
    bundle_dir = Path(bundle_dir)
    manifest = manifest if manifest is not None else read_manifest(bundle_dir)
    if is_dp_bundle(manifest):
        required = [n for n in required if n != "cooccurrence.npz"]
    files: dict[str, str] = manifest["files"]
    for name in required:
        if name not in files:
            raise BundleError(f"bundle {bundle_dir}: required file {name} is not listed in "
                              f"{MANIFEST}")
    for name, expected in files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle {bundle_dir}: file {name} is listed in {MANIFEST} but "
                              f"missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"bundle {bundle_dir}: file {name} fails its checksum (manifest "
                              f"sha256 {expected[:12]}..., file has {actual[:12]}...): it was "
                              f"changed or corrupted after the bundle was written")
    return manifest


@dataclass
class Bundle:
    """A loaded bundle: manifest, model config, vocabulary, co-occurrence, reference stats."""

    path: Path
    manifest: dict[str, Any]
    model_config: dict[str, Any]
    vocab: Vocabulary
    cooccurrence: sp.csr_matrix | None  # None in a DP bundle
    reference_stats: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        """Path of a listed file; BundleError if the manifest does not list it."""
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path}: no file {name} (listed: "
                              f"{', '.join(sorted(self.manifest['files']))})")
        return self.path / name

    def has_file(self, name: str) -> bool:
        return name in self.manifest["files"]

    def load_train_index(self) -> list[dict[str, Any]]:
        for name in ("train_index.json.gz", "train_index.json"):
            if self.has_file(name):
                return load_train_index(self.path / name)
        raise BundleError(f"bundle {self.path}: no retrieval index (train_index.json.gz)")


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle's runtime pieces after checking format version and checksums."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if verify:
        verify_bundle(bundle_dir, manifest)

    def _load(name: str, fn):
        try:
            return fn(bundle_dir / name)
        except BundleError:
            raise
        except Exception as err:
            raise BundleError(f"bundle {bundle_dir}: file {name} cannot be read: {err}") from err

    vocab = _load("vocab.json", Vocabulary.load)
    cooc = _load("cooccurrence.npz", lambda p: load_cooccurrence(p, vocab)) \
        if "cooccurrence.npz" in manifest["files"] or not is_dp_bundle(manifest) else None
    stats = _load("reference_stats.json", lambda p: json.loads(p.read_text()))
    config = _load("config.json", lambda p: json.loads(p.read_text()))
    return Bundle(bundle_dir, manifest, config, vocab, cooc, stats)


def load_train_index(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)["patients"]


def _histogram(values: Iterable[int]) -> dict[str, int]:
    counts = Counter(values)
    return {str(k): int(counts[k]) for k in sorted(counts)}


def reference_stats(patients: list[Patient], vocab: Vocabulary) -> dict[str, Any]:
    """Statistics of a split: code frequencies (visits containing each vocabulary code, in
    vocabulary order, plus per-category), codes-per-visit and visits-per-patient histograms,
    age (by year, capped at 90) and sex distributions, and the quantiles of lengths of stay and
    inter-visit gaps (``visit_intervals``, :func:`app.dating.interval_stats`; a documented
    default where the source has no visit times).

    Only vocabulary codes count (codes removed by small-cell suppression appear nowhere);
    visits left empty by that are not counted."""
    visits = [[[c for c in v if c in vocab.index] for v in p.visits] for p in patients]
    visits = [[v for v in pv if v] for pv in visits]
    n_visits = sum(len(pv) for pv in visits)
    code_counts: Counter[str] = Counter(c for pv in visits for v in pv for c in v)
    ages = np.array([p.age for p in patients], dtype=float)
    category_counts: Counter[str] = Counter()
    for code, n in code_counts.items():
        category_counts[code[:4] if code.startswith("E") else code[:3]] += n
    return {
        "n_patients": len(patients),
        "n_visits": n_visits,
        "n_code_occurrences": int(sum(code_counts.values())),
        "codes": vocab.codes,
        "code_visit_counts": [int(code_counts.get(c, 0)) for c in vocab.codes],
        "category_visit_counts": dict(sorted(category_counts.items())),
        "codes_per_visit": _histogram(len(v) for pv in visits for v in pv),
        "visits_per_patient": _histogram(len(pv) for pv in visits),
        "age_years": _histogram(int(min(a, 90)) for a in ages),
        "age_mean": float(ages.mean()) if ages.size else 0.0,
        "age_std": float(ages.std()) if ages.size else 0.0,
        "sex": {s: sum(1 for p in patients if p.sex == s) for s in SEXES},
        "visit_intervals": interval_stats(patients),
    }
