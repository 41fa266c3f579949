"""Writing a model bundle (the format is in ``models/README.md``; the reader is
:mod:`app.bundle`).

The manifest is written last (atomically), so a folder with a valid manifest is a complete
bundle. Files added later (the ONNX graphs) are registered with :func:`add_bundle_file`, which
records their SHA-256 in the manifest.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import scipy.sparse as sp

from app.bundle import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    read_manifest,
    reference_stats,
    sha256_file,
)
from app.cooccurrence import save_cooccurrence
from app.corpus import Patient
from app.vocab import Vocabulary

__all__ = ["add_bundle_file", "corpus_hash", "write_bundle", "write_manifest"]


def corpus_hash(patients: list[Patient]) -> str:
    """SHA-256 of the loaded corpus content (ids, demographics, visits, in corpus order)."""
    digest = hashlib.sha256()
    for p in patients:
        visits = ";".join(",".join(v) for v in p.visits)
        digest.update(f"{p.patient_id}|{p.age:.4f}|{p.sex}|{visits}\n".encode())
    return digest.hexdigest()


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Atomically (re)write ``manifest.json``."""
    bundle_dir = Path(bundle_dir)
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, bundle_dir / MANIFEST)


def _software() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "safetensors"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:  # pragma: no cover
            pass
    return versions


def write_bundle(bundle_dir: str | Path, *, model, vocab: Vocabulary,
                 cooccurrence: sp.spmatrix | None, train_patients: list[Patient],
                 run_config: dict[str, Any], data: dict[str, Any], splits: dict[str, int],
                 metrics: dict[str, Any], write_index: bool = True,
                 privacy: dict[str, Any] | None = None,
                 reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every bundle file and the manifest; returns the manifest.

    A DP bundle (``privacy["differential_privacy"]`` set) gets its DP-released ``reference``
    statistics, no co-occurrence matrix (``cooccurrence=None``) and no retrieval index. Codes
    outside ``vocab`` (small-cell suppression) are left out of every file.
    """
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    dp = bool((privacy or {}).get("differential_privacy"))
    if dp and (cooccurrence is not None or reference is None):
        raise ValueError("a DP bundle ships DP-released reference statistics and no "
                         "co-occurrence matrix")
    model.save(bundle_dir)  # config.json + model.safetensors
    vocab.save(bundle_dir / "vocab.json")
    names = ["config.json", "model.safetensors", "vocab.json"]
    if cooccurrence is not None:
        save_cooccurrence(cooccurrence, bundle_dir / "cooccurrence.npz")
        names.append("cooccurrence.npz")
    stats = reference if reference is not None else reference_stats(train_patients, vocab)
    (bundle_dir / "reference_stats.json").write_text(json.dumps(stats))
    names.append("reference_stats.json")
    if write_index and not dp:
        records = []
        for p in train_patients:  # suppressed codes never leave in the index either
            visits = [[c for c in v if c in vocab.index] for v in p.visits]
            visits = [v for v in visits if v]
            if visits:
                records.append({"id": p.patient_id, "age": p.age, "sex": p.sex,
                                "visits": visits})
        index = {"format": "synthehr-train-index-1", "split": "train", "patients": records}
        with gzip.open(bundle_dir / "train_index.json.gz", "wt", compresslevel=6) as handle:
            json.dump(index, handle)
        names.append("train_index.json.gz")
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": bundle_dir.name,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": model.config.to_dict(),
        "n_parameters": model.n_parameters(),
        "run_config": run_config,
        "data": data,
        "splits": splits,
        "vocabulary": {"tokens": len(vocab), "codes": vocab.n_codes,
                       "categories": vocab.n_categories, "chapters": vocab.n_chapters},
        "metrics": metrics,
        "privacy": privacy or {"small_cell_suppression": None, "differential_privacy": None},
        "software": _software(),
        "files": {name: sha256_file(bundle_dir / name) for name in names},
    }
    write_manifest(bundle_dir, manifest)
    return manifest


def add_bundle_file(bundle_dir: str | Path, name: str) -> str:
    """Register (or refresh) ``bundle_dir/name`` in the manifest's checksums; returns sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to add to the bundle")
    manifest = read_manifest(bundle_dir)
    digest = sha256_file(path)
    manifest["files"][name] = digest
    write_manifest(bundle_dir, manifest)
    return digest
