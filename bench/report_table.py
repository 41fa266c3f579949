"""One markdown table of the headline fidelity figures of several evaluation reports.

    .venv/bin/python bench/report_table.py reports/uciB-cal reports/uciD [--row plain]

Each argument is a ``synthehr evaluate --out`` folder (its ``report.json``); the table has one
row per report (the chosen cohort row, ``plain`` by default) and the floor and baseline rows of
the first report, so figures from different runs sit side by side without retyping them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("jsd", "JSD", "{:.4f}"), ("top100_overlap", "top-100", "{:.3f}"),
           ("unigram_r2", "unigram R2", "{:.3f}"), ("bigram_r2", "bigram R2", "{:.3f}"),
           ("ks_visits_per_patient", "KS visits/patient", "{:.3f}"),
           ("mean_visits_per_patient", "visits/patient", "{:.3f}"),
           ("ks_codes_per_visit", "KS codes/visit", "{:.3f}"),
           ("validity", "validity", "{:.2%}"), ("exact_copy_rate", "exact-copy", "{:.1%}"),
           ("mia_auc", "MIA AUC", "{:.3f}"), ("distinct_codes", "distinct codes", "{:,.0f}")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--row", default="plain", help="cohort row to take from each report")
    args = parser.parse_args()
    lines = ["| run | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "| --- |" + " ---: |" * len(COLUMNS)]
    first = None
    for folder in args.reports:
        report = json.loads((folder / "report.json").read_text())
        first = first or report
        row = report["rows"][args.row]
        lines.append(f"| {folder.name} ({args.row}) | "
                     + " | ".join(_cell(row, *c[::2]) for c in COLUMNS) + " |")
    for name in ("floor", "baseline"):
        if first and name in first["rows"]:
            lines.append(f"| {name} | " + " | ".join(_cell(first["rows"][name], *c[::2])
                                                   for c in COLUMNS) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
