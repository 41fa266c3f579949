"""The evaluation report: ``report.json``, a self-contained ``report.html``, ``report.md`` (the
README table) and the terminal table.

:func:`write_report` writes the three files; the work is split by job:

- :mod:`training.report.tables`: which metrics, their order and format, the targets each row is
  judged against, the terminal and README tables and the JSON document;
- :mod:`training.report.plots`: the matplotlib figures;
- :mod:`training.report.html`: the HTML page.

:func:`markdown_table`, :func:`print_table` and :func:`report_json` are re-exported here as the
package's public entry points beside :func:`write_report`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from app.corpus import Patient
from app.evaluation.protocol import RELATIVE_TARGETS, Target
from training.report.html import render_html
from training.report.tables import README_METRICS_2, markdown_table, print_table, report_json

__all__ = ["markdown_table", "print_table", "report_json", "write_report"]


def write_report(out_dir: str | Path, rows: Mapping[str, Mapping[str, float]],
                 cohorts: Mapping[str, Sequence[Patient]], test: Sequence[Patient],
                 train: Sequence[Patient] | None = None, meta: Mapping | None = None,
                 targets: Sequence[Target] = RELATIVE_TARGETS,
                 details: Mapping | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` and ``report.md`` (the README table) into
    ``out_dir``; returns their paths by kind (``json``, ``html``, ``md``).

    ``meta`` should name the source (``source``, optionally ``source_citation``); split sizes
    are added from ``test``/``train`` when absent.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    sizes = {"test": len(test)}
    if train is not None:
        sizes["train"] = len(train)
    meta.setdefault("split_sizes", sizes)
    paths = {"json": out / "report.json", "html": out / "report.html", "md": out / "report.md"}
    paths["json"].write_text(json.dumps(report_json(rows, meta, targets, details), indent=2)
                             + "\n")
    paths["html"].write_text(render_html(rows, cohorts, test, meta, targets, details),
                             encoding="utf-8")
    source = meta.get("source", "unknown source")
    citation = f" ({meta['source_citation']})" if meta.get("source_citation") else ""
    paths["md"].write_text(f"Evaluation on {source}{citation}, test split "
                           f"({len(test):,} patients), protocol of DESIGN.md.\n\n"
                           + markdown_table(rows, targets=targets) + "\n"
                           + markdown_table(rows, README_METRICS_2, targets=targets),
                           encoding="utf-8")
    return paths
