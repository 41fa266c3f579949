"""Loaders: each source in, one :class:`app.corpus.Corpus` out.

Every loader takes the path and an optional ``date_format`` (strptime codes; ``None`` means
ISO 8601, or the layout's own documented format for DE-SynPUF); sources without dates refuse a
format. :func:`load_corpus` also refuses a load that keeps no patient or drops more than
``max_drop_share`` of the patients it read (:data:`MAX_DROP_SHARE` by default).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from app.corpus import Corpus
from training.loaders.common import MAX_DROP_SHARE, DataError, check_kept
from training.loaders.eicu import load_eicu
from training.loaders.generic import load_generic
from training.loaders.mimic3 import load_mimic3
from training.loaders.mimic4 import load_mimic4
from training.loaders.synpuf import load_synpuf
from training.loaders.uci import load_uci

LOADERS: dict[str, Callable[..., Corpus]] = {
    "mimic3": load_mimic3,
    "mimic4": load_mimic4,
    "eicu": load_eicu,
    "uci": load_uci,
    "generic": load_generic,
    "synpuf": load_synpuf,
}
SOURCES = tuple(LOADERS)


def load_corpus(source: str, path: str | Path, date_format: str | None = None,
                max_drop_share: float = MAX_DROP_SHARE) -> Corpus:
    """Load ``path`` with the loader for ``source`` (one of :data:`SOURCES`).

    Raises :class:`DataError` for bad input, and for a load that keeps no patient or drops more
    than ``max_drop_share`` of the patients it read (the message lists the top drop reasons).
    """
    if source not in LOADERS:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if not 0 <= max_drop_share <= 1:
        raise ValueError(f"max_drop_share must lie in [0, 1], got {max_drop_share}")
    corpus = LOADERS[source](path, date_format=date_format)
    check_kept(corpus, path, max_drop_share)
    return corpus


__all__ = ["LOADERS", "MAX_DROP_SHARE", "SOURCES", "DataError", "load_corpus"]
