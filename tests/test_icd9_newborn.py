"""V30-V39 (liveborn infants) are newborn-only: the documented supplement to the MCE edits."""

from __future__ import annotations

import numpy as np

from app.decoding.validity import ValidityMask
from app.icd9.edits import NEWBORN_SUPPLEMENT, load_edits
from app.icd9.hierarchy import load_hierarchy
from app.vocab import Vocabulary


def liveborn_codes() -> list[str]:
    return [c for c in load_hierarchy().billable_codes if c[:3] in NEWBORN_SUPPLEMENT]


def test_every_liveborn_code_is_newborn_only():
    edits = load_edits()
    codes = liveborn_codes()
    assert len(codes) == 36
    for code in codes:
        assert edits.is_valid(code, 0, "M") and edits.is_valid(code, 0.9, "F")
        assert not edits.is_valid(code, 1, "F") and not edits.is_valid(code, 70, "M")
    # The nine the MCE list leaves out are the supplement, and their violation says so.
    assert edits.supplemented == {c for c in codes if c.endswith("2")}
    assert "supplement" in edits.violation("V312", 70, "M")
    assert "MCE age edit" in edits.violation("V3000", 70, "M")


def test_the_decoder_validity_mask_forbids_v312_for_adults():
    codes = ["4019", "V312", "V3000"]
    vocab = Vocabulary(codes, np.ones(len(codes), dtype=np.int64), ["401", "V30", "V31"])
    mask = ValidityMask(vocab)
    allowed = mask.mask(np.array([70.0, 0.0]), np.array([1, 1]))
    column = {code: vocab.index[code] for code in codes}
    assert allowed[0, column["4019"]] and not allowed[0, column["V312"]]
    assert allowed[1, column["V312"]] and allowed[1, column["V3000"]]
