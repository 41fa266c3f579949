"""The ``parquet`` result format: the long format (one row per code) as typed Parquet.

Written with pyarrow's ``ParquetWriter`` into an in-memory sink that is drained after every
row group (``ROW_GROUP`` rows), so memory stays bounded by one row group whatever the cohort's
size. Columns (:data:`SCHEMA`): ``patient_id`` string, ``person_number`` int64, ``age`` float64,
``sex`` string, ``birth_date`` date32, ``visit_id`` string, ``visit_seq`` int32,
``visit_start`` and ``visit_end`` timestamp[ms] (Parquet has no second unit), ``code`` string (undotted ICD-9-CM),
``category``, ``chapter`` and ``description`` strings (``description`` null where CMS has no
title). Snappy compression.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from app.service.exports import ExportContext, _Sink, code_detail

__all__ = ["ROW_GROUP", "SCHEMA", "parquet_stream"]

ROW_GROUP = 50_000
SCHEMA = pa.schema([
    ("patient_id", pa.string()), ("person_number", pa.int64()), ("age", pa.float64()),
    ("sex", pa.string()), ("birth_date", pa.date32()), ("visit_id", pa.string()),
    ("visit_seq", pa.int32()), ("visit_start", pa.timestamp("ms")),
    ("visit_end", pa.timestamp("ms")), ("code", pa.string()), ("category", pa.string()),
    ("chapter", pa.string()), ("description", pa.string())])


class _ArrowSink(_Sink):
    """The byte sink as pyarrow wants a Python file: it also asks ``closed`` and ``tell``."""

    closed = False
    _written = 0

    def write(self, data) -> int:
        n = super().write(data)
        self._written += n
        return n

    def tell(self) -> int:
        return self._written

    def close(self) -> None:
        self.closed = True


def parquet_stream(rows: Iterable[dict], context: ExportContext) -> Iterator[bytes]:
    """The file's bytes, one row group at a time."""
    sink = _ArrowSink()
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    with pq.ParquetWriter(sink, SCHEMA, compression="snappy") as writer:
        for row in rows:
            dates = context.dates(row)
            birth = dates.birth.date()
            for seq, (visit, (start, end)) in enumerate(
                    zip(row["visits"], dates.visits, strict=True), start=1):
                for code in visit:
                    d = code_detail(code)
                    for name, value in (
                            ("patient_id", row["id"]), ("person_number", int(row["n"])),
                            ("age", float(row["age"])), ("sex", row["sex"]),
                            ("birth_date", birth), ("visit_id", f"{row['id']}-v{seq}"),
                            ("visit_seq", seq), ("visit_start", start), ("visit_end", end),
                            ("code", code), ("category", d["category"]),
                            ("chapter", d["chapter"]), ("description", d["description"])):
                        columns[name].append(value)
            if len(columns["code"]) >= ROW_GROUP:
                writer.write_table(pa.table(columns, schema=SCHEMA))
                columns = {name: [] for name in SCHEMA.names}
                yield sink.drain()
        if columns["code"]:
            writer.write_table(pa.table(columns, schema=SCHEMA))
    yield sink.drain()
