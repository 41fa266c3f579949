"""Deterministic 80/10/10 train/validation/test split by a hash of the patient id.

The hash (SHA-256 of ``salt:patient_id``) makes a patient's split independent of the order and
content of the rest of the data, so a re-export or an appended extract keeps every patient where
it was. Every statistic the model or decoder uses comes from ``train``; evaluation compares
against ``test``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from app.corpus import Patient

__all__ = ["SPLITS", "Split", "split_of", "split_patients"]

SPLITS = ("train", "val", "test")
DEFAULT_SALT = "synthehr-split-v1"
# Cumulative percent boundaries: [0, 80) train, [80, 90) val, [90, 100) test.
_BOUNDS = (80, 90)


def split_of(patient_id: str, salt: str = DEFAULT_SALT) -> str:
    """The split (``train``, ``val`` or ``test``) of one patient id."""
    digest = hashlib.sha256(f"{salt}:{patient_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < _BOUNDS[0]:
        return "train"
    return "val" if bucket < _BOUNDS[1] else "test"


@dataclass(frozen=True)
class Split:
    train: list[Patient]
    val: list[Patient]
    test: list[Patient]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_patients(patients: list[Patient], salt: str = DEFAULT_SALT) -> Split:
    """Partition patients into train/val/test by :func:`split_of`, keeping their order."""
    parts: dict[str, list[Patient]] = {name: [] for name in SPLITS}
    for patient in patients:
        parts[split_of(patient.patient_id, salt)].append(patient)
    return Split(**parts)
