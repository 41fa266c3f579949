"""Token vocabulary and the ICD-9-CM hierarchy arrays the model and decoder index by.

Token ids: the structure tokens first (:data:`SPECIAL_TOKENS`), then the codes of the training
split in sorted order. Each code token maps to a category id and each category to a chapter id
(:data:`app.icd9.hierarchy.CHAPTERS` order), which the factorised output head and the summed
input embeddings use. Code counts (visits containing the code in the training split) ride along
as the reference frequencies.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.corpus import Patient
from app.icd9.codes import category_of
from app.icd9.hierarchy import CHAPTERS, chapter_of

__all__ = ["BOS", "CODE_ORDERS", "END_VISIT", "EOS", "MASK", "PAD", "SPECIAL_TOKENS", "VISIT",
           "Vocabulary", "code_patient_counts", "code_rank"]

PAD, BOS, EOS, VISIT, END_VISIT, MASK = "<pad>", "<s>", "</s>", "<v>", "</v>", "<mask>"
SPECIAL_TOKENS = (PAD, BOS, EOS, VISIT, END_VISIT, MASK)
FORMAT = "synthehr-vocab-1"
# order of the codes inside a visit (a visit is a set) in training: "shuffle" (a new permutation
# every epoch), "hierarchy" (chapter, category, code: the vocabulary order) or "frequency"
# (commonest training code first). A model trained on a fixed order is decoded under it.
CODE_ORDERS = ("shuffle", "hierarchy", "frequency")


def code_patient_counts(patients: Iterable[Patient]) -> Counter[str]:
    """Number of distinct patients carrying each code (in any visit)."""
    return Counter(c for p in patients for c in {c for v in p.visits for c in v})


@dataclass
class Vocabulary:
    """Structure tokens + codes, with code -> category -> chapter index arrays."""

    codes: list[str]
    counts: np.ndarray  # visits containing each code in train (DP bundle: noisy patients)
    categories: list[str]

    def __post_init__(self) -> None:
        # small-cell suppression of :meth:`from_patients` (not stored in vocab.json: the
        # bundle's manifest records it)
        self.suppressed = 0
        self.min_patients = 1
        self.tokens: list[str] = [*SPECIAL_TOKENS, *self.codes]
        self.index: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        cat_index = {c: i for i, c in enumerate(self.categories)}
        self.code_category = np.array([cat_index[category_of(c)] for c in self.codes],
                                      dtype=np.int64)
        self.category_chapter = np.array([chapter_of(c).index for c in self.categories],
                                         dtype=np.int64)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_patients(cls, patients: Iterable[Patient], min_count: int = 1,
                      min_patients: int = 1) -> Vocabulary:
        """Codes seen in at least ``min_count`` visits and carried by at least ``min_patients``
        distinct patients of ``patients`` (the training split).

        ``min_patients`` is the small-cell suppression threshold ``k``: a code fewer than ``k``
        patients carry is left out, so it is never generated nor listed. How many codes it
        removed (codes that passed ``min_count``) is :attr:`suppressed`.
        """
        patients = list(patients)
        counts: Counter[str] = Counter(c for p in patients for v in p.visits for c in v)
        carriers = code_patient_counts(patients)
        frequent = [c for c, n in counts.items() if n >= min_count]
        codes = sorted(c for c in frequent if carriers[c] >= min_patients)
        categories = sorted({category_of(c) for c in codes})
        vocab = cls(codes, np.array([counts[c] for c in codes], dtype=np.int64), categories)
        vocab.suppressed = len(frequent) - len(codes)
        vocab.min_patients = int(min_patients)
        return vocab

    # -- sizes and lookups --------------------------------------------------------------------
    @property
    def n_special(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def n_codes(self) -> int:
        return len(self.codes)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def n_chapters(self) -> int:
        return len(CHAPTERS)

    def __len__(self) -> int:
        return len(self.tokens)

    def code_id(self, code: str) -> int:
        """Index of ``code`` among codes (0-based, not the token id); KeyError if unknown."""
        return self.index[code] - self.n_special

    def token_id(self, token: str) -> int:
        return self.index[token]

    def __contains__(self, code: str) -> bool:
        return code in self.index

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``vocab.json``: format tag, codes with counts, categories."""
        payload = {"format": FORMAT, "special_tokens": list(SPECIAL_TOKENS),
                   "codes": self.codes, "counts": self.counts.tolist(),
                   "categories": self.categories}
        Path(path).write_text(json.dumps(payload))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        payload = json.loads(Path(path).read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"{path}: vocabulary format {payload.get('format')!r}, "
                             f"expected {FORMAT!r}")
        if tuple(payload["special_tokens"]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: special tokens differ from this version's")
        return cls(payload["codes"], np.asarray(payload["counts"], dtype=np.int64),
                   payload["categories"])


def code_rank(vocab: Vocabulary, order: str) -> np.ndarray | None:
    """Sort key per token id for a fixed in-visit order (None for ``shuffle``)."""
    if order not in CODE_ORDERS:
        raise ValueError(f"objective.code_order: unknown {order!r}; use one of "
                         f"{', '.join(CODE_ORDERS)}")
    if order == "shuffle":
        return None
    n = len(vocab)
    if order == "hierarchy":  # the vocabulary lists codes sorted, i.e. by chapter and category
        return np.arange(n)
    counts = np.zeros(n)
    counts[vocab.n_special:] = np.asarray(vocab.counts, dtype=np.float64)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(n)
    return rank
