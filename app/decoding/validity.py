"""The validity mask: which codes a patient of a given age and sex may receive.

Source: the CMS Medicare Code Editor (MCE) v32 (FY 2015, the last ICD-9-CM release),
"Definitions of Medicare Code Edits", diagnosis **age edits** (``Newborn_Only`` age 0,
``Pediatric_Only`` 0-17, ``Maternity_Only`` 12-55, ``Adult_Only`` 15-124) and **sex edits**
(``Female_Only``, ``Male_Only``), as shipped in ``app/icd9/data/MCE_Simple_Code_Edits_v32.txt``
and parsed by :func:`app.icd9.edits.load_edits`. A code under no edit is valid for everyone;
ages are whole years (``int(age)``) as the MCE counts them.

:class:`ValidityMask` turns the edits into per-code arrays over a vocabulary once, so a batch's
``[B, V]`` mask is a few vectorised comparisons; structure tokens are always allowed.
"""

from __future__ import annotations

import numpy as np

from app.corpus import SEX_IDS
from app.icd9.edits import CodeEdits, load_edits
from app.vocab import Vocabulary

__all__ = ["ValidityMask"]

_NO_SEX = -1


class ValidityMask:
    """MCE age/sex consistency of every vocabulary code, as arrays over token ids."""

    def __init__(self, vocab: Vocabulary, edits: CodeEdits | None = None) -> None:
        self.edits = edits or load_edits()
        self.vocab = vocab
        size = len(vocab)
        self.min_age = np.zeros(size, dtype=np.int32)
        self.max_age = np.full(size, 10_000, dtype=np.int32)
        self.sex = np.full(size, _NO_SEX, dtype=np.int8)
        for token_id in range(vocab.n_special, size):
            code = vocab.tokens[token_id]
            span = self.edits.age_edits.get(code)
            if span is not None:
                self.min_age[token_id], self.max_age[token_id] = span
            required = self.edits.sex_edits.get(code)
            if required is not None:
                self.sex[token_id] = SEX_IDS[required]

    def mask(self, age: np.ndarray, sex: np.ndarray) -> np.ndarray:
        """Bool ``[B, V]``: token allowed for each patient (``sex`` as 0 = F, 1 = M)."""
        years = np.floor(np.asarray(age, dtype=np.float64)).astype(np.int32)[:, None]
        sex = np.asarray(sex, dtype=np.int8)[:, None]
        return ((self.min_age[None, :] <= years) & (years <= self.max_age[None, :])
                & ((self.sex[None, :] == _NO_SEX) | (self.sex[None, :] == sex)))

    def violation(self, code: str, age: float, sex: str) -> str | None:
        """Why ``code`` is inconsistent with the patient under the MCE edits; None if it is not."""
        return self.edits.violation(code, age, sex)
