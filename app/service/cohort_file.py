"""A cohort written straight to a file, without the service (``synthehr generate``).

The cohort is generated chunk by chunk exactly as the service's worker does
(:func:`app.service.jobs.generate_chunk` through the generation service, with the job id the
service would give the same spec and bundle), so the file holds the same patients, ids and dates as
``GET /v1/cohorts/{id}/result?format=...`` run with the same ``chunk_size`` and
``generation_batch``. Generated rows are spooled to a temporary NDJSON file (the table formats
read the cohort once per table), never held in memory; the output is written to ``<out>.part``
and renamed when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.runtime.generation import GenerationService
from app.runtime.requests import CohortSpec
from app.service import exports
from app.service.jobs import generate_chunk, job_id_for

__all__ = ["CohortFile", "write_cohort"]


@dataclass(frozen=True)
class CohortFile:
    """What :func:`write_cohort` wrote."""

    path: Path
    format: str
    patients: int
    job_id: str
    bundle_version: str
    bytes: int


def write_cohort(generator, spec: CohortSpec, fmt: str, out: str | Path, *,
                 chunk_size: int = 500, batch: int = 64, concepts=None) -> CohortFile:
    """Generate ``spec`` with ``generator`` and write it to ``out`` in ``fmt``
    (one of :data:`app.service.exports.FORMATS`). The spec is taken as checked (the caller
    refuses what the service would, :meth:`GenerationService.prepare`)."""
    if fmt not in exports.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(exports.FORMATS)}")
    out = Path(out)
    job_id = job_id_for(spec, generator.bundle_version)
    n_chunks = -(-spec.size // chunk_size)
    generation = GenerationService.of(generator)
    with tempfile.TemporaryDirectory(prefix="synthehr-cohort-") as tmp:
        spool = Path(tmp) / "rows.ndjson"
        with open(spool, "w", encoding="utf-8") as handle:
            for index in range(n_chunks):
                rows = generate_chunk(generation, spec, job_id, index, chunk_size, batch)
                handle.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)

        def rows() -> Iterator[dict]:
            with open(spool, encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)

        meta = {"id": job_id, "bundle_version": generator.bundle_version, "count": spec.size}
        context = exports.ExportContext.for_result(
            job_id, getattr(generator, "visit_intervals", None), concepts)
        part = out.with_name(out.name + ".part")
        size = 0
        with open(part, "wb") as handle:
            for block in exports.stream(fmt, rows, meta, context):
                handle.write(block)
                size += len(block)
        os.replace(part, out)
    return CohortFile(out, fmt, spec.size, job_id, generator.bundle_version, size)
