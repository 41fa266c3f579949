"""Keep filesystem paths out of every response.

A deployment's paths (where the bundle lives, where the training data was read from) say
nothing a client needs and something an attacker could use, so anything the service echoes -
the manifest, load errors, job errors - goes through :func:`public_value` or
:func:`redact_text`. A path is replaced by its last component (``../shared/data/uci`` ->
``uci``), which keeps the useful part (the data set's or bundle's name).
"""

from __future__ import annotations

import re
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Any

__all__ = ["is_path_like", "public_value", "redact_text"]

# Keys whose string values are paths whatever they look like.
_PATH_KEYS = {"path", "dir", "directory", "file", "out", "output", "bundle", "data_dir"}
_PATH_SUFFIXES = ("_path", "_dir", "_file", "_folder")
# An absolute or relative path inside free text: a run of non-space characters holding a
# separator, starting with /, ~, ./, ../ or a drive letter.
_PATH_IN_TEXT = re.compile(r"""(?<![\w:/])(?:~|\.{1,2}|[A-Za-z]:)?[/\\][^\s'"`,;()]*""")


def is_path_like(key: str | None, value: str) -> bool:
    """True when ``value`` (under ``key``) names a file or folder."""
    if key is not None and (key.lower() in _PATH_KEYS or key.lower().endswith(_PATH_SUFFIXES)):
        return True
    return "/" in value or "\\" in value


def _name(value: str) -> str:
    path: PurePath = PureWindowsPath(value) if "\\" in value else PurePosixPath(value)
    return path.name or "."


def redact_text(text: str) -> str:
    """``text`` with every path in it reduced to its last component."""
    return _PATH_IN_TEXT.sub(lambda m: _name(m.group(0)), text)


def public_value(obj: Any, key: str | None = None) -> Any:
    """A JSON-like value with every path-like string reduced to its last component."""
    if isinstance(obj, dict):
        return {k: public_value(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [public_value(v, key) for v in obj]
    if isinstance(obj, str) and is_path_like(key, obj):
        return _name(obj)
    return obj
