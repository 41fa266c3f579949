"""Loaders: each source in, one :class:`app.corpus.Corpus` out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from app.corpus import Corpus
from training.loaders.common import DataError
from training.loaders.eicu import load_eicu
from training.loaders.generic import load_generic
from training.loaders.mimic3 import load_mimic3
from training.loaders.mimic4 import load_mimic4
from training.loaders.uci import load_uci

LOADERS: dict[str, Callable[[str | Path], Corpus]] = {
    "mimic3": load_mimic3,
    "mimic4": load_mimic4,
    "eicu": load_eicu,
    "uci": load_uci,
    "generic": load_generic,
}
SOURCES = tuple(LOADERS)


def load_corpus(source: str, path: str | Path) -> Corpus:
    """Load ``path`` with the loader for ``source`` (one of :data:`SOURCES`)."""
    if source not in LOADERS:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    return LOADERS[source](path)


__all__ = ["DataError", "LOADERS", "SOURCES", "load_corpus"]
