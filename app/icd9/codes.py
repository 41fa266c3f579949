"""ICD-9-CM diagnosis code syntax: normalisation to the undotted form and the category prefix.

Sources write the same code in several ways. The accepted spellings, all mapped to one canonical
form (undotted, upper case, the 3-character numeric or ``V`` category, 4 characters for ``E``
codes, zero-padded):

- undotted: ``25000``, ``V3000``, ``E8497``;
- dotted after the category: ``250.00``, ``V30.00``, ``E849.7``, ``v57.1`` (any letter case);
- leading zeros dropped from the category, as in UCI Diabetes 130: ``8`` and ``8.5`` are ``008``
  and ``0085`` (``V1`` is ``V01``); only the dotted-after-the-category or category-only forms
  can be padded, since elsewhere the place of the missing zeros is unknown;
- a dot anywhere else in an otherwise valid code, as some MIMIC-IV-format exports write E-codes:
  ``E87.82`` is ``E8782``, ``25.000`` is ``25000`` (dots are removed, the rest must be canonical);
- surrounding spaces and double quotes are ignored.

Digits must be ASCII ``0-9``: fullwidth (``２５０``) or Arabic-Indic (``٢٥٠``) digits are not an
ICD-9-CM code. ICD-10-CM codes (``I10``, ``S73.00``) are rejected; :func:`looks_like_icd10` tells
a loader when a rejected value has ICD-10-CM's shape, so its drop can say so. A mixed list that
holds both systems (eICU's ``"276.51, E86.0"``) must set ICD-10-shaped entries aside before
normalising, since ``E86.0`` with its dot removed reads as the ICD-9-CM E-code ``E860``.
"""

from __future__ import annotations

import re

__all__ = [
    "InvalidCodeError",
    "category_of",
    "dotted_code",
    "looks_like_icd10",
    "normalize_code",
    "try_normalize_code",
]

# re.ASCII: \d would otherwise match any Unicode decimal digit (fullwidth, Arabic-Indic, ...).
# Canonical undotted forms: 3-5 digits; V + 2-4 digits; E + 3-4 digits.
_CANONICAL = re.compile(r"^(?:\d{3,5}|V\d{2,4}|E\d{3,4})$", re.ASCII)
# The standard dotted form: the dot right after the category, whose leading zeros may be missing.
_DOTTED = re.compile(r"^(?P<major>\d{1,3}|V\d{1,2}|E\d{3})\.(?P<minor>\d{0,2})$", re.ASCII)
_UNDOTTED_SHORT = re.compile(r"^(?:\d{1,2}|V\d)$", re.ASCII)
# ICD-10-CM: a letter, a digit, then a digit or letter, optionally a dot and up to 4 more.
# Letters other than E and V never start an ICD-9-CM code; E with two digits before a dot
# (``E86.0``) has the ICD-10-CM shape but may also be an ICD-9-CM E-code with a misplaced dot.
# V with two digits and a dot is the standard ICD-9-CM spelling (``V62.84``), never set aside.
_ICD10 = re.compile(r"^[A-Z]\d[0-9A-Z](?:\.?[0-9A-Z]{1,4})?$", re.ASCII)
_ICD10_ONLY_LETTER = re.compile(r"^[A-DF-UW-Z]", re.ASCII)


class InvalidCodeError(ValueError):
    """A value that is not an ICD-9-CM diagnosis code."""


def _pad_major(major: str) -> str:
    if major[0] == "V":
        return "V" + major[1:].zfill(2)
    if major[0] == "E":
        return "E" + major[1:].zfill(3)
    return major.zfill(3)


def _clean(raw: object) -> str:
    return "" if raw is None else str(raw).strip().strip('"').strip().upper()


def normalize_code(raw: object) -> str:
    """Return the canonical undotted ICD-9-CM form of ``raw`` (spellings: see the module doc).

    ``250.00 -> 25000``, ``8 -> 008``, ``v57.1 -> V571``, ``E87.82 -> E8782``.
    Raises :class:`InvalidCodeError` for anything that is not ICD-9-CM (``ABC``, ``I10``, empty,
    non-ASCII digits).
    """
    text = _clean(raw)
    if not text or text in {"NAN", "NONE", "NULL", "?"}:
        raise InvalidCodeError("empty code")
    if "." in text:
        match = _DOTTED.match(text)
        # A dot elsewhere is only punctuation: no zeros can be restored around it.
        code = (_pad_major(match["major"]) + match["minor"] if match is not None
                else text.replace(".", ""))
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


def looks_like_icd10(raw: object, *, strict: bool = False) -> bool:
    """Whether ``raw`` has the shape of an ICD-10-CM code.

    By default only a letter that never starts an ICD-9-CM code counts (``I10``, ``S73.00``).
    ``strict=True`` also counts ``E`` followed by two digits and a dot (``E86.0``), the reading
    a source that mixes both systems needs.
    """
    text = _clean(raw)
    if not _ICD10.match(text):
        return False
    if _ICD10_ONLY_LETTER.match(text):
        return True
    return strict and re.match(r"^E\d\d\.", text, re.ASCII) is not None


def category_of(code: str) -> str:
    """The 3-character category of a canonical code (4 characters for E-codes)."""
    return code[:4] if code.startswith("E") else code[:3]


def dotted_code(code: str) -> str:
    """The dotted spelling of a canonical code, as FHIR and OHDSI Athena write ICD-9-CM:
    ``25000 -> 250.00``, ``V571 -> V57.1``, ``E8120 -> E812.0``, ``401 -> 401``."""
    category = category_of(code)
    rest = code[len(category):]
    return f"{category}.{rest}" if rest else category
