"""ICD-9-CM diagnosis code syntax: normalisation to the undotted form and the category prefix.

Sources write the same code in several ways: dotted (``250.00``), undotted (``25000``), with
leading zeros dropped (``8`` for ``008``, as in UCI Diabetes 130), or as an "ICD-9, ICD-10" pair
(eICU). Everything downstream uses one canonical form: undotted, upper case, the 3-character
numeric or ``V`` category (4 characters for ``E`` codes) zero-padded.
"""

from __future__ import annotations

import re

__all__ = [
    "InvalidCodeError",
    "category_of",
    "dotted_code",
    "normalize_code",
    "try_normalize_code",
]

# Canonical undotted forms: 3-5 digits; V + 2-4 digits; E + 3-4 digits.
_CANONICAL = re.compile(r"^(?:\d{3,5}|V\d{2,4}|E\d{3,4})$")
# ICD-9 E-codes always carry 3 digits, which keeps ICD-10 codes such as ``E87.0`` out.
_DOTTED = re.compile(r"^(?P<major>\d{1,3}|V\d{1,2}|E\d{3})\.(?P<minor>\d{0,2})$")
_UNDOTTED_SHORT = re.compile(r"^(?:\d{1,2}|V\d)$")


class InvalidCodeError(ValueError):
    """A value that is not an ICD-9-CM diagnosis code."""


def _pad_major(major: str) -> str:
    if major[0] == "V":
        return "V" + major[1:].zfill(2)
    if major[0] == "E":
        return "E" + major[1:].zfill(3)
    return major.zfill(3)


def normalize_code(raw: object) -> str:
    """Return the canonical undotted ICD-9-CM form of ``raw``.

    ``250.00 -> 25000``, ``8 -> 008``, ``v57.1 -> V571``, ``E909 -> E909``.
    Raises :class:`InvalidCodeError` for anything that is not ICD-9-CM (``ABC``, ``I10``, empty).
    """
    if raw is None:
        raise InvalidCodeError("empty code")
    text = str(raw).strip().strip('"').strip().upper()
    if not text or text in {"NAN", "NONE", "NULL", "?"}:
        raise InvalidCodeError("empty code")
    if "." in text:
        match = _DOTTED.match(text)
        if match is None:
            raise InvalidCodeError(f"not an ICD-9-CM code: {raw!r}")
        code = _pad_major(match["major"]) + match["minor"]
    elif _UNDOTTED_SHORT.match(text):
        # Only a category whose leading zeros were dropped can be this short.
        code = _pad_major(text)
    else:
        code = text
    if not _CANONICAL.match(code):
        raise InvalidCodeError(f"not an ICD-9-CM code: {raw!r}")
    return code


def try_normalize_code(raw: object) -> str | None:
    """:func:`normalize_code`, returning ``None`` instead of raising."""
    try:
        return normalize_code(raw)
    except InvalidCodeError:
        return None


def category_of(code: str) -> str:
    """The 3-character category of a canonical code (4 characters for E-codes)."""
    return code[:4] if code.startswith("E") else code[:3]


def dotted_code(code: str) -> str:
    """The dotted spelling of a canonical code, as FHIR and OHDSI Athena write ICD-9-CM:
    ``25000 -> 250.00``, ``V571 -> V57.1``, ``E8120 -> E812.0``, ``401 -> 401``."""
    category = category_of(code)
    rest = code[len(category):]
    return f"{category}.{rest}" if rest else category
