"""Errors the generation engine raises for requests it cannot honour (all ``ValueError``)."""

from __future__ import annotations

__all__ = [
    "GenerationError",
    "ImpossibleConstraintError",
    "InvalidParametersError",
    "PrivacyGuardError",
    "StrategyUnavailableError",
    "UnknownCodeError",
]


class GenerationError(ValueError):
    """Base class: a generation request the engine refuses, with the reason."""


class UnknownCodeError(GenerationError):
    """A requested code is not ICD-9-CM or not in the bundle's vocabulary."""


class ImpossibleConstraintError(GenerationError):
    """Constraints no output can satisfy (e.g. a pregnancy code for a man with the mask on)."""


class InvalidParametersError(GenerationError):
    """Bad strategy parameters or demographics; the message names each offending field."""


class PrivacyGuardError(GenerationError):
    """retrieve_edit could not produce a patient far enough from every training patient."""


class StrategyUnavailableError(InvalidParametersError):
    """A strategy the bundle cannot serve (e.g. ``retrieve_edit`` on a DP bundle); says why."""
