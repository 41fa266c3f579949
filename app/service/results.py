"""Cohort results kept as files: one file per chunk under a folder or any fsspec URL.

A cohort larger than ``result_inline_max_patients`` (when ``results_url`` is set) keeps its
patients out of Redis: the worker writes chunk ``i`` of job ``j`` to ``<results_url>/<j>/<i>.ndjson``
(the same bytes the store would have held) and stores an empty marker in the job store, so the
store still decides when the job is done and keeps its exactly-once counting. A chunk re-run
after a worker died writes the same bytes again (a chunk is a pure function of the job), so the
file is identical whoever wrote it last.

Any fsspec URL works: a local folder (``/var/lib/synthehr/results`` or ``file://...``) or an
object store (``s3://bucket/prefix`` with ``s3fs`` installed). The API and every worker must
see the same URL.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import fsspec

__all__ = ["ResultFiles", "job_folder", "sweep_orphans"]

SUFFIX = ".ndjson"
JOB_FOLDER = re.compile(r"[0-9a-f]{32}")  # a job id (app.service.jobs.job_id_for)


class ResultFiles:
    """The chunk files of one job, under ``folder`` (an fsspec URL or a local path)."""

    def __init__(self, folder: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(folder)
        self.root = self.root.rstrip("/")

    def path(self, index: int) -> str:
        return f"{self.root}/{index}{SUFFIX}"

    def write(self, index: int, payload: bytes) -> None:
        """Write one chunk: to a temporary name, then moved into place, so a reader never sees
        a half-written file even when a slow worker rewrites a chunk another one finished."""
        self.fs.makedirs(self.root, exist_ok=True)
        tmp = f"{self.root}/.{index}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, payload)
        self.fs.mv(tmp, self.path(index))

    def read(self, index: int) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(index))
        except FileNotFoundError:
            return None

    def complete(self, n_chunks: int) -> bool:
        """True when every one of the ``n_chunks`` files is there (one listing, not n checks)."""
        try:
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)}
        except FileNotFoundError:
            return False
        return all(f"{i}{SUFFIX}" in names for i in range(n_chunks))

    def remove(self) -> None:
        try:
            self.fs.rm(self.root, recursive=True)
        except FileNotFoundError:
            pass


def job_folder(results_url: str, job_id: str) -> str:
    """The folder URL of a job's chunk files."""
    return f"{results_url.rstrip('/')}/{job_id}"


def sweep_orphans(results_url: str, is_known: Callable[[str], bool]) -> int:
    """Delete the chunk folders of jobs the store no longer knows (expired, or lost with a
    store that was restarted without persistence); returns how many were removed."""
    fs, root = fsspec.core.url_to_fs(results_url)
    try:
        entries = fs.ls(root.rstrip("/"), detail=True)
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        # Only job folders: a shared results location may hold other things.
        if entry.get("type") != "directory" or not JOB_FOLDER.fullmatch(name) \
                or is_known(name):
            continue
        fs.rm(entry["name"], recursive=True)
        removed += 1
    return removed
