"""The report's numbers: which metrics it shows and how (:class:`MetricSpec`, :data:`METRICS`),
the row order (strategies, then the ``floor`` and ``baseline`` references), value formatting,
the targets each row is judged against, and the text outputs built from them: the terminal
table (:func:`print_table`), the README table (:func:`markdown_table`) and the JSON document
(:func:`report_json`).

Rows are cohorts (each decoding strategy, then the ``floor`` and ``baseline`` references of the
same run), values are :func:`app.evaluation.evaluate_cohort` dicts. The plots are in
:mod:`training.report.plots`, the HTML page in :mod:`training.report.html`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.evaluation.protocol import RELATIVE_TARGETS, Target, check_targets

__all__ = [
    "BASELINE",
    "FLOOR",
    "FORMAT",
    "METRICS",
    "README_METRICS",
    "README_METRICS_2",
    "REFERENCE_LABELS",
    "MetricSpec",
    "cohort_label",
    "format_value",
    "is_finite",
    "markdown_table",
    "present_metrics",
    "print_table",
    "references",
    "report_json",
    "row_checks",
    "row_order",
    "target_text",
    "targets_by_metric",
]

FORMAT = "synthehr-report-1"
FLOOR, BASELINE = "floor", "baseline"
REFERENCE_LABELS = {FLOOR: "floor (real train sample)",
                    BASELINE: "baseline (independent marginals)"}


@dataclass(frozen=True)
class MetricSpec:
    """One metric row of the report: its key in a cohort's values, the label shown, the
    number format, the group it is listed under and a one-line definition (``help``)."""

    key: str
    label: str
    fmt: str  # "f3" (3 decimals), "f4", "f1", "pct" (percent, 1 decimal), "pct2", "int"
    group: str
    help: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("jsd", "JSD", "f4", "fidelity",
               "base-2 Jensen-Shannon divergence of code frequencies vs test"),
    MetricSpec("top100_overlap", "top-100 overlap", "f3", "fidelity",
               "Jaccard of the 100 most frequent codes (ties by code)"),
    MetricSpec("unigram_r2", "unigram R2", "f3", "fidelity",
               "R2 of per-visit code prevalence, test as reference, union of codes"),
    MetricSpec("bigram_r2", "bigram R2", "f3", "fidelity",
               "R2 of per-visit unordered-pair prevalence, union of pairs"),
    MetricSpec("cooccurrence_score", "co-occurrence score", "f1", "fidelity",
               "mean over visits of the summed test-split counts of the visit's pairs"),
    MetricSpec("unigram_r2_gap_closed", "unigram R2: share of gap closed", "pct", "fidelity",
               "(value - baseline) / (floor - baseline); 100% = at the floor"),
    MetricSpec("bigram_r2_gap_closed", "bigram R2: share of gap closed", "pct", "fidelity",
               "(value - baseline) / (floor - baseline); 100% = at the floor"),
    MetricSpec("sequential_r2", "sequential R2", "f3", "sequence",
               "R2 of P(code b in visit t+1 | code a in visit t), codes a with >= 50 real "
               "transitions"),
    MetricSpec("sequential_r2_gap_closed", "sequential R2: share of gap closed", "pct",
               "sequence", "(value - baseline) / (floor - baseline)"),
    MetricSpec("tail_jsd", "long-tail JSD", "f4", "long tail",
               "JSD over codes below the median training frequency"),
    MetricSpec("tail_unigram_r2", "long-tail unigram R2", "f3", "long tail",
               "per-visit prevalence R2 over codes below the median training frequency"),
    MetricSpec("tail_distinct_codes", "long-tail codes generated", "int", "long tail",
               "distinct tail codes in the cohort"),
    MetricSpec("tail_distinct_codes_test", "long-tail codes in real test", "int", "long tail",
               "reference"),
    MetricSpec("distinct_codes_test", "distinct codes in real test", "int", "long tail",
               "reference"),
    MetricSpec("stratum_jsd_worst", "worst age band x sex JSD", "f4", "strata",
               "largest within-stratum JSD (strata with >= 30 patients on both sides)"),
    MetricSpec("stratum_unigram_r2_worst", "worst age band x sex unigram R2", "f3", "strata",
               "smallest within-stratum unigram R2"),
    MetricSpec("stratum_jsd_mean", "mean age band x sex JSD", "f4", "strata",
               "weighted by real test patients"),
    MetricSpec("detection_auc", "detection AUC", "f3", "detection and utility",
               "5-fold logistic regression telling the cohort from real test patients; "
               "0.5 = cannot"),
    MetricSpec("tstr_auroc", "utility AUROC (train on cohort)", "f3", "detection and utility",
               "task trained on the cohort, tested on real test"),
    MetricSpec("tstr_auroc_real", "utility AUROC (train on real)", "f3",
               "detection and utility", "the same task trained on real training patients"),
    MetricSpec("ks_visits_per_patient", "KS visits/patient", "f3", "structure",
               "two-sample KS statistic vs test"),
    MetricSpec("ks_codes_per_visit", "KS codes/visit", "f3", "structure",
               "two-sample KS statistic vs test"),
    MetricSpec("mean_codes_per_visit", "mean codes/visit", "f2", "structure", ""),
    MetricSpec("mean_visits_per_patient", "mean visits/patient", "f3", "structure", ""),
    MetricSpec("over_length_visits", "visits over train max length", "pct", "structure",
               "share of visits with more codes than the longest training visit"),
    MetricSpec("well_formed", "well-formed", "pct", "structure",
               "patients with >= 1 visit, no empty visit, no repeated code in a visit"),
    MetricSpec("validity", "validity (mask on)", "pct2", "validity",
               "code occurrences consistent with age and sex under MCE v32 edits"),
    MetricSpec("validity_model_alone", "validity (model alone)", "pct2", "validity",
               "the same, decoding without the validity mask"),
    MetricSpec("exact_copy_rate", "exact-copy rate", "pct", "privacy",
               "patients whose visit sequence (visits as code sets) equals a training patient's"),
    MetricSpec("exact_copy_rate_test", "exact-copy rate, real test", "pct", "privacy",
               "the same for real test patients: the reference"),
    MetricSpec("dcr_mean", "DCR mean", "f3", "privacy",
               "Jaccard distance of all-codes sets to the closest training patient"),
    MetricSpec("dcr_median", "DCR median", "f3", "privacy", ""),
    MetricSpec("dcr_zero_share", "DCR = 0 share", "pct", "privacy", ""),
    MetricSpec("dcr_test_mean", "DCR mean, real test", "f3", "privacy", "reference"),
    MetricSpec("mia_auc", "membership-inference AUC", "f3", "privacy",
               "nearest-synthetic-neighbour attack, train members vs test non-members"),
    MetricSpec("attr_inference_f1", "attribute inference F1", "f3", "privacy",
               "nearest-record attack on training patients' mental-disorder codes"),
    MetricSpec("attr_inference_f1_holdout", "attribute inference F1, real holdout", "f3",
               "privacy", "the same attack with the real test split released: the reference"),
    MetricSpec("anonymeter_singling_out", "Anonymeter singling-out risk", "f3", "privacy",
               "univariate singling out, test split as control"),
    MetricSpec("anonymeter_linkability", "Anonymeter linkability risk", "f3", "privacy",
               "two halves of the flattened columns linked, 10 neighbours"),
    MetricSpec("anonymeter_inference", "Anonymeter inference risk", "f3", "privacy",
               "inference of the chapter flag nearest 50% prevalence from the other columns"),
    MetricSpec("generation_seconds", "generation time (s)", "f1", "size",
               "wall-clock seconds to generate the cohort"),
    MetricSpec("n_patients", "patients", "int", "size", ""),
    MetricSpec("n_visits", "visits", "int", "size", ""),
    MetricSpec("distinct_codes", "distinct codes", "int", "size", ""),
)

# The columns of the README tables.
README_METRICS = ("jsd", "top100_overlap", "unigram_r2", "bigram_r2", "cooccurrence_score",
                  "ks_codes_per_visit", "validity", "validity_model_alone", "well_formed",
                  "exact_copy_rate", "dcr_mean", "mia_auc")
README_METRICS_2 = ("sequential_r2", "tail_jsd", "tail_unigram_r2", "tail_distinct_codes",
                    "stratum_jsd_worst", "detection_auc", "tstr_auroc", "tstr_auroc_real",
                    "attr_inference_f1", "attr_inference_f1_holdout",
                    "anonymeter_singling_out", "anonymeter_linkability",
                    "anonymeter_inference")


def cohort_label(name: str) -> str:
    """The name a cohort is shown under: the references' long labels, a strategy as is."""
    return REFERENCE_LABELS.get(name, name)


def row_order(rows: Mapping[str, Mapping]) -> list[str]:
    """Strategies in insertion order, then the floor, then the baseline."""
    names = [n for n in rows if n not in REFERENCE_LABELS]
    return names + [n for n in (FLOOR, BASELINE) if n in rows]


def is_finite(value: object) -> bool:
    """Whether ``value`` is a finite int or float (a missing or NaN value is shown as ``-``)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_value(value: object, fmt: str) -> str:
    """``value`` in the :class:`MetricSpec` format ``fmt``; ``-`` when not finite."""
    if not is_finite(value):
        return "-"
    if fmt == "pct":
        return f"{100 * value:.1f}%"
    if fmt == "pct2":
        return f"{100 * value:.2f}%"
    if fmt == "int":
        return f"{round(value):,}"
    return f"{value:.{int(fmt[1:])}f}"


def targets_by_metric(targets: Sequence[Target]) -> dict[str, Target]:
    """The targets keyed by the metric they judge."""
    return {t.metric: t for t in targets}


def references(rows: Mapping[str, Mapping[str, float]]) -> dict[str, Mapping[str, float]]:
    """The run's floor and baseline rows, which reference-relative targets compare with."""
    return {n: rows[n] for n in (FLOOR, BASELINE) if n in rows}


def row_checks(rows: Mapping[str, Mapping[str, float]], targets: Sequence[Target]
               ) -> dict[str, dict[str, bool | None]]:
    """Cohort -> metric -> pass/fail/None, every row judged against the same references."""
    refs = references(rows)
    return {n: check_targets(rows[n], targets, refs) for n in row_order(rows)}


def target_text(target: Target, rows: Mapping[str, Mapping[str, float]]) -> str:
    """The target's rule, with the number it works out to in this run where that number is
    the same for every row (reference-relative kinds)."""
    text = target.describe()
    if target.kind != "absolute":
        bound = target.bound({}, references(rows))
        if bound is not None:
            text += f" (= {bound:.4g})"
    return text


def present_metrics(specs: Sequence[MetricSpec], rows: Mapping[str, Mapping]
                    ) -> list[MetricSpec]:
    """The metrics of ``specs`` with a finite value in at least one row."""
    return [s for s in specs if any(is_finite(r.get(s.key)) for r in rows.values())]


# -- terminal and markdown ---------------------------------------------------------------------

def print_table(rows: Mapping[str, Mapping[str, float]], console=None, title: str | None = None,
                targets: Sequence[Target] = RELATIVE_TARGETS) -> None:
    """The report as a rich table: metrics down, cohorts across, a target column; a value
    meeting its target is green, one missing it red (references included, for context)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    order = row_order(rows)
    by_metric = targets_by_metric(targets)
    table = Table(title=title, header_style="bold", show_lines=False)
    table.add_column("metric")
    for name in order:
        table.add_column(cohort_label(name), justify="right",
                         style="dim" if name in REFERENCE_LABELS else None)
    table.add_column("target", justify="right")
    checks = row_checks(rows, targets)
    group = None
    for spec in present_metrics(METRICS, rows):
        if group is not None and spec.group != group:
            table.add_section()
        group = spec.group
        cells = []
        for name in order:
            text = format_value(rows[name].get(spec.key), spec.fmt)
            ok = checks[name].get(spec.key)
            if ok is True:
                text = f"[green]{text} ✓[/]"
            elif ok is False:
                text = f"[red]{text} ✗[/]"
            cells.append(text)
        target = by_metric.get(spec.key)
        table.add_row(spec.label, *cells, target_text(target, rows) if target else "")
    console.print(table)


def markdown_table(rows: Mapping[str, Mapping[str, float]],
                   metrics: Sequence[str] = README_METRICS,
                   targets: Sequence[Target] = RELATIVE_TARGETS) -> str:
    """The README table: one line per cohort, the headline metrics across, a target line; a
    value missing its target is marked with a trailing ``✗``."""
    specs = {s.key: s for s in METRICS}
    keys = [k for k in metrics if k in specs
            and any(is_finite(r.get(k)) for r in rows.values())]
    by_metric = targets_by_metric(targets)
    checks_by_row = row_checks(rows, targets)
    header = "| cohort | " + " | ".join(specs[k].label for k in keys) + " |"
    lines = [header, "| --- |" + " ---: |" * len(keys)]
    for name in row_order(rows):
        checks = checks_by_row[name]
        cells = []
        for k in keys:
            text = format_value(rows[name].get(k), specs[k].fmt)
            if checks.get(k) is False and name not in REFERENCE_LABELS:
                text += " ✗"
            cells.append(text)
        lines.append(f"| {cohort_label(name)} | " + " | ".join(cells) + " |")
    lines.append("| target | " + " | ".join(
        target_text(by_metric[k], rows) if k in by_metric else "" for k in keys) + " |")
    return "\n".join(lines) + "\n"


# -- json --------------------------------------------------------------------------------------

def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def report_json(rows: Mapping[str, Mapping[str, float]], meta: Mapping,
                targets: Sequence[Target] = RELATIVE_TARGETS,
                details: Mapping | None = None) -> dict:
    """The JSON document: format, meta, row order, rows, targets (with the bound each works
    out to in this run where it is the same for every row), per-row pass/fail, details (strata,
    utility task, Anonymeter status), metric definitions. NaN becomes null."""
    refs = references(rows)
    order = row_order(rows)
    return _clean({
        "format": FORMAT,
        "meta": dict(meta),
        "order": order,
        "reference_rows": [n for n in order if n in REFERENCE_LABELS],
        "rows": {n: dict(rows[n]) for n in order},
        "targets": [{"metric": t.metric, "op": t.op, "value": t.value, "kind": t.kind,
                     "relative_to": t.relative_to, "slack": t.slack, "label": t.describe(),
                     "bound": t.bound({}, refs) if t.kind != "absolute" else
                     (t.value if t.relative_to is None else None)} for t in targets],
        "checks": row_checks(rows, targets),
        "details": dict(details or {}),
        "definitions": {s.key: s.help for s in METRICS if s.help},
    })
