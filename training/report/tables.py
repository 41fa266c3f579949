"""The evaluation report: ``report.json``, a self-contained ``report.html``, ``report.md`` (the
README table) and the terminal table.

Rows are cohorts (each decoding strategy, then the ``floor`` and ``baseline`` references of the
same run), values are :func:`app.evaluation.evaluate_cohort` dicts. The HTML carries its plots as
inline base64 PNG (matplotlib, Agg backend) and its CSS inline: no external file, script or
font, so it opens on a machine with no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from app.corpus import AGE_BINS, SEXES, Patient
from app.evaluation.counting import code_counts
from app.evaluation.fidelity import aligned_prevalence, jsd_from_counts, r2_score
from app.evaluation.protocol import RELATIVE_TARGETS, Target, check_targets
from app.icd9.codes import InvalidCodeError
from app.icd9.hierarchy import CHAPTERS, chapter_of

__all__ = [
    "BASELINE",
    "FLOOR",
    "FORMAT",
    "METRICS",
    "REFERENCE_LABELS",
    "MetricSpec",
    "format_value",
    "markdown_table",
    "print_table",
    "render_html",
    "report_json",
    "row_order",
    "write_report",
]

FORMAT = "synthehr-report-1"
FLOOR, BASELINE = "floor", "baseline"
REFERENCE_LABELS = {FLOOR: "floor (real train sample)",
                    BASELINE: "baseline (independent marginals)"}


@dataclass(frozen=True)
class MetricSpec:
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


def _label(name: str) -> str:
    return REFERENCE_LABELS.get(name, name)


def row_order(rows: Mapping[str, Mapping]) -> list[str]:
    """Strategies in insertion order, then the floor, then the baseline."""
    names = [n for n in rows if n not in REFERENCE_LABELS]
    return names + [n for n in (FLOOR, BASELINE) if n in rows]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_value(value, fmt: str) -> str:
    if not _finite(value):
        return "-"
    if fmt == "pct":
        return f"{100 * value:.1f}%"
    if fmt == "pct2":
        return f"{100 * value:.2f}%"
    if fmt == "int":
        return f"{round(value):,}"
    return f"{value:.{int(fmt[1:])}f}"


def _targets_by_metric(targets: Sequence[Target]) -> dict[str, Target]:
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


def _present(specs: Sequence[MetricSpec], rows: Mapping[str, Mapping]) -> list[MetricSpec]:
    return [s for s in specs if any(_finite(r.get(s.key)) for r in rows.values())]


# -- terminal and markdown ---------------------------------------------------------------------

def print_table(rows: Mapping[str, Mapping[str, float]], console=None, title: str | None = None,
                targets: Sequence[Target] = RELATIVE_TARGETS) -> None:
    """The report as a rich table: metrics down, cohorts across, a target column; a value
    meeting its target is green, one missing it red (references included, for context)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    order = row_order(rows)
    by_metric = _targets_by_metric(targets)
    table = Table(title=title, header_style="bold", show_lines=False)
    table.add_column("metric")
    for name in order:
        table.add_column(_label(name), justify="right",
                         style="dim" if name in REFERENCE_LABELS else None)
    table.add_column("target", justify="right")
    checks = row_checks(rows, targets)
    group = None
    for spec in _present(METRICS, rows):
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
            and any(_finite(r.get(k)) for r in rows.values())]
    by_metric = _targets_by_metric(targets)
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
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
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


# -- plots -------------------------------------------------------------------------------------

_REAL_COLOR = "#555555"
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22")


def _colors(order: Sequence[str]) -> dict[str, str]:
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(order)}


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return (n + cols - 1) // cols, cols


def plot_prevalence(cohorts: Mapping[str, Sequence[Patient]], test: Sequence[Patient],
                    order_: int) -> str:
    """Real vs synthetic per-visit prevalence of codes (1) or pairs (2), log-log, one panel per
    cohort; zeros are drawn on the axis floor (grey)."""
    plt = _pyplot()
    names = list(cohorts)
    n_rows, n_cols = _grid(len(names))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 4.0 * n_rows),
                             squeeze=False)
    colors = _colors(names)
    n_test_visits = sum(len(p.visits) for p in test)
    for ax, name in zip(axes.flat, names):
        y, yhat, _ = aligned_prevalence(test, cohorts[name], order_)
        n_syn_visits = sum(len(p.visits) for p in cohorts[name])
        floor = 0.5 / max(n_test_visits, n_syn_visits, 1)
        both = (y > 0) & (yhat > 0)
        ax.scatter(y[both], yhat[both], s=6 if order_ == 1 else 3, alpha=0.5,
                   color=colors[name], rasterized=True, linewidths=0)
        lone = ~both
        ax.scatter(np.maximum(y[lone], floor), np.maximum(yhat[lone], floor),
                   s=10 if order_ == 1 else 6, alpha=0.5, color="#777777", rasterized=True,
                   marker="x", linewidths=0.6, label="absent on one side")
        top = max(float(y.max(initial=0)), float(yhat.max(initial=0)), floor * 10) * 1.5
        ax.plot([floor, top], [floor, top], color="black", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor * 0.7, top)
        ax.set_ylim(floor * 0.7, top)
        r2 = r2_score(y, yhat) if y.size else float("nan")
        ax.set_title(f"{_label(name)}\nR2 {r2:.3f} over {y.size:,} "
                     f"{'codes' if order_ == 1 else 'pairs'}", fontsize=9)
        ax.set_xlabel("real test prevalence (share of visits)", fontsize=8)
        ax.set_ylabel("synthetic prevalence", fontsize=8)
        ax.tick_params(labelsize=7)
        if lone.any():
            ax.legend(fontsize=7, loc="upper left", markerscale=1.5)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _share_hist(values: np.ndarray, cap: int) -> np.ndarray:
    clipped = np.minimum(values, cap)
    counts = np.bincount(clipped, minlength=cap + 1)[1:cap + 1].astype(float)
    shares = counts / max(counts.sum(), 1.0)
    return np.where(shares > 0, shares, np.nan)  # log scale: leave empty bins blank


def plot_histograms(cohorts: Mapping[str, Sequence[Patient]], test: Sequence[Patient]) -> str:
    """Codes per visit and visits per patient: real test as grey bars, cohorts as lines."""
    plt = _pyplot()
    colors = _colors(list(cohorts))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))

    def cpv(ps):
        return np.array([len(set(v)) for p in ps for v in p.visits], dtype=int)

    def vpp(ps):
        return np.array([len(p.visits) for p in ps], dtype=int)

    for ax, fn, title in ((axes[0], cpv, "codes per visit"),
                          (axes[1], vpp, "visits per patient")):
        real = fn(test)
        values = {n: fn(ps) for n, ps in cohorts.items()}
        top = max([int(real.max(initial=1))] + [int(v.max(initial=1)) for v in values.values()])
        cap = min(max(top, 1), 15)
        xs = np.arange(1, cap + 1)
        ax.bar(xs, _share_hist(real, cap), color=_REAL_COLOR, alpha=0.35, label="real test")
        for name, v in values.items():
            ax.plot(xs, _share_hist(v, cap), marker="o", ms=3, lw=1.2, color=colors[name],
                    label=_label(name))
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x}+" if x == cap and top > cap else str(x) for x in xs],
                           fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("share (log scale)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _chapter_shares(patients: Sequence[Patient]) -> np.ndarray:
    shares = np.zeros(len(CHAPTERS) + 1)
    for code, n in code_counts(patients).items():
        try:
            shares[chapter_of(code).index] += n
        except InvalidCodeError:
            shares[-1] += n
    return shares / max(shares.sum(), 1.0)


def plot_chapters(cohorts: Mapping[str, Sequence[Patient]], test: Sequence[Patient]) -> str:
    """Share of code occurrences per ICD-9-CM chapter: real test as grey bars, each cohort as
    a marker on the same row."""
    plt = _pyplot()
    names = list(cohorts)
    colors = _colors(names)
    real = _chapter_shares(test)
    series = {n: _chapter_shares(ps) for n, ps in cohorts.items()}
    keep = [i for i in range(len(CHAPTERS) + 1)
            if real[i] > 0 or any(s[i] > 0 for s in series.values())]

    def label(i: int) -> str:
        if i == len(CHAPTERS):
            return "other"
        title = CHAPTERS[i].title
        return f"{CHAPTERS[i].key} {title if len(title) <= 40 else title[:39] + '…'}"

    fig, ax = plt.subplots(figsize=(10, 0.38 * len(keep) + 1.4))
    pos = np.arange(len(keep))
    ax.barh(pos, real[keep], height=0.7, color=_REAL_COLOR, alpha=0.3, label="real test")
    markers = "ods^v<>Ph"
    for j, name in enumerate(names):
        ax.scatter(series[name][keep], pos, color=colors[name], marker=markers[j % len(markers)],
                   s=28, zorder=3, label=_label(name))
    ax.set_yticks(pos)
    ax.set_yticklabels([label(i) for i in keep], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of code occurrences")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _age_label(low: int, high: int) -> str:
    return "0" if (low, high) == (0, 1) else f"{low}-{high - 1}"


def _groups(patients: Sequence[Patient]) -> dict[tuple[int, str], list[Patient]]:
    out: dict[tuple[int, str], list[Patient]] = {}
    for p in patients:
        for b, (low, high) in enumerate(AGE_BINS):
            if low <= p.age < high:
                out.setdefault((b, p.sex), []).append(p)
                break
    return out


def age_sex_breakdown(cohorts: Mapping[str, Sequence[Patient]], test: Sequence[Patient],
                      min_patients: int = 30) -> dict:
    """Per age bin x sex: patients in the test split and each cohort, and the JSD of each
    cohort's code frequencies against the test split's within the group (groups with at least
    ``min_patients`` on both sides)."""
    real = _groups(test)
    grouped = {name: _groups(patients) for name, patients in cohorts.items()}
    keys = [(b, s) for b in range(len(AGE_BINS)) for s in SEXES
            if real.get((b, s)) or any(g.get((b, s)) for g in grouped.values())]
    labels = [f"{_age_label(*AGE_BINS[b])} {s}" for b, s in keys]
    out = {"groups": labels, "patients": {"real test": [len(real.get(k, [])) for k in keys]},
           "jsd": {}}
    for name in cohorts:
        groups = grouped[name]
        out["patients"][name] = [len(groups.get(k, [])) for k in keys]
        values = []
        for k in keys:
            a, b = real.get(k, []), groups.get(k, [])
            if len(a) < min_patients or len(b) < min_patients:
                values.append(float("nan"))
                continue
            ca, cb = code_counts(a), code_counts(b)
            codes = sorted(set(ca) | set(cb))
            values.append(jsd_from_counts(np.array([ca.get(c, 0) for c in codes]),
                                          np.array([cb.get(c, 0) for c in codes])))
        out["jsd"][name] = values
    return out


def plot_age_sex(breakdown: dict, names: Sequence[str]) -> str:
    """Patients per age bin and sex (conditioning check) and within-group JSD vs test."""
    plt = _pyplot()
    colors = _colors(list(names))
    labels = breakdown["groups"]
    pos = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    ax = axes[0]
    ax.bar(pos, breakdown["patients"]["real test"], color=_REAL_COLOR, alpha=0.35,
           label="real test")
    for name in names:
        ax.plot(pos, breakdown["patients"][name], marker="o", ms=3, lw=1.0, color=colors[name],
                label=_label(name))
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=60, fontsize=8)
    ax.set_title("patients by age at first visit and sex")
    ax.legend(fontsize=7)
    ax = axes[1]
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        values = np.array(breakdown["jsd"][name], dtype=float)
        ax.bar(pos + j * width - 0.4 + width / 2, np.nan_to_num(values), width=width,
               color=colors[name], label=_label(name))
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=60, fontsize=8)
    ax.set_title("JSD of code frequencies vs real test, within each group\n"
                 "(blank: fewer than 30 patients)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_sequential(cohorts: Mapping[str, Sequence[Patient]], test: Sequence[Patient],
                    min_support: int = 50) -> str:
    """Real vs cohort P(code b in visit t+1 | code a in visit t) for the conditioning codes
    with enough real support (the sequential R2's points), one panel per cohort."""
    from app.evaluation.breakdown import conditional_probabilities

    plt = _pyplot()
    names = list(cohorts)
    n_rows, n_cols = _grid(len(names))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 4.0 * n_rows),
                             squeeze=False)
    colors = _colors(names)
    for ax, name in zip(axes.flat, names):
        p_real, p_syn = conditional_probabilities(test, cohorts[name], min_support)
        support = (p_real + p_syn).tocoo()
        y = yhat = np.zeros(0)
        if support.nnz:
            y = np.asarray(p_real[support.row, support.col], dtype=float).ravel()
            yhat = np.asarray(p_syn[support.row, support.col], dtype=float).ravel()
        ax.scatter(y, yhat, s=4, alpha=0.4, color=colors[name], rasterized=True, linewidths=0)
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
        r2 = r2_score(y, yhat) if y.size else float("nan")
        ax.set_title(f"{_label(name)}\nR2 {r2:.3f} over {y.size:,} (a, b)", fontsize=9)
        ax.set_xlabel("real test P(b in next visit | a)", fontsize=8)
        ax.set_ylabel("cohort", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def plot_strata(strata: Mapping[str, Sequence[Mapping]], names: Sequence[str]) -> str:
    """Within-stratum JSD (age band x sex) of each cohort vs real test; blank where a side has
    fewer than 30 patients."""
    plt = _pyplot()
    colors = _colors(list(names))
    labels = sorted({s["stratum"] for n in names for s in strata.get(n, [])},
                    key=lambda x: (int(x.split("-")[0].split("+")[0]), x))
    pos = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        by = {s["stratum"]: s["jsd"] for s in strata.get(name, [])}
        values = np.array([by.get(lab, float("nan")) for lab in labels], dtype=float)
        ax.bar(pos + j * width - 0.4 + width / 2, np.nan_to_num(values), width=width,
               color=colors[name], label=_label(name))
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=30, fontsize=8)
    ax.set_ylabel("JSD vs real test, within stratum")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# -- html --------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; font-size: 1.25em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.pass { background: #e3f6e3; } td.fail { background: #fbe1e1; }
td.ref, th.ref { color: #555; font-style: italic; }
tr.section td { background: #fafafa; font-weight: bold; border-top: 2px solid #bbb; }
.meta td:first-child { font-weight: bold; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; max-width: 1000px; }
.small { color: #666; font-size: 0.85em; }
"""


def _metrics_table_html(rows: Mapping[str, Mapping[str, float]],
                        targets: Sequence[Target]) -> str:
    order = row_order(rows)
    by_metric = _targets_by_metric(targets)
    checks = row_checks(rows, targets)
    out = ["<table><thead><tr><th>metric</th>"]
    for name in order:
        cls = ' class="ref"' if name in REFERENCE_LABELS else ""
        out.append(f"<th{cls}>{html.escape(_label(name))}</th>")
    out.append("<th>target</th></tr></thead><tbody>")
    group = None
    for spec in _present(METRICS, rows):
        if spec.group != group:
            group = spec.group
            out.append(f'<tr class="section"><td colspan="{len(order) + 2}">'
                       f"{html.escape(group)}</td></tr>")
        title = f' title="{html.escape(spec.help)}"' if spec.help else ""
        out.append(f"<tr><td{title}>{html.escape(spec.label)}</td>")
        for name in order:
            ok = checks[name].get(spec.key)
            classes = ["num"]
            if ok is True:
                classes.append("pass")
            elif ok is False:
                classes.append("fail")
            if name in REFERENCE_LABELS:
                classes.append("ref")
            mark = " ✓" if ok is True else (" ✗" if ok is False else "")
            value = format_value(rows[name].get(spec.key), spec.fmt)
            out.append(f'<td class="{" ".join(classes)}">{html.escape(value + mark)}</td>')
        target = by_metric.get(spec.key)
        out.append(f"<td>{html.escape(target_text(target, rows)) if target else ''}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def verdict_html(rows: Mapping[str, Mapping[str, float]], targets: Sequence[Target]) -> str:
    """The one-screen verdict: per target, each cohort's value marked met or not, with the
    floor and baseline beside it, and a count of targets met per strategy."""
    order = row_order(rows)
    strategies = [n for n in order if n not in REFERENCE_LABELS]
    checks = row_checks(rows, targets)
    specs = {s.key: s for s in METRICS}
    measured = [t for t in targets if any(_finite(rows[n].get(t.metric)) for n in order)]
    lines = []
    for name in strategies:
        results = [checks[name].get(t.metric) for t in measured]
        met = sum(r is True for r in results)
        known = sum(r is not None for r in results)
        lines.append(f"<li><b>{html.escape(name)}</b>: {met} of {known} measured targets met"
                     + ("" if met == known else ": misses " + html.escape(", ".join(
                         specs[t.metric].label if t.metric in specs else t.metric
                         for t, r in zip(measured, results) if r is False)))
                     + "</li>")
    out = ['<section id="verdict"><h2>Verdict</h2>']
    if lines:
        out.append("<ul>" + "".join(lines) + "</ul>")
    out.append("<table><thead><tr><th>metric</th><th>target</th>")
    for name in order:
        cls = ' class="ref"' if name in REFERENCE_LABELS else ""
        out.append(f"<th{cls}>{html.escape(_label(name))}</th>")
    out.append("</tr></thead><tbody>")
    for t in measured:
        spec = specs.get(t.metric)
        label = spec.label if spec else t.metric
        out.append(f"<tr><td>{html.escape(label)}</td>"
                   f"<td>{html.escape(target_text(t, rows))}</td>")
        for name in order:
            ok = checks[name].get(t.metric)
            classes = ["num"] + (["pass"] if ok is True else ["fail"] if ok is False else [])
            if name in REFERENCE_LABELS:
                classes.append("ref")
            mark = " ✓" if ok is True else (" ✗" if ok is False else "")
            value = format_value(rows[name].get(t.metric), spec.fmt if spec else "f3")
            out.append(f'<td class="{" ".join(classes)}">{html.escape(value + mark)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></section>")
    return "".join(out)


def anonymeter_html(rows: Mapping[str, Mapping[str, float]], status: str = "") -> str:
    """Each cohort's three Anonymeter risks with their 95% confidence intervals."""
    order = row_order(rows)
    risks = ("singling_out", "linkability", "inference")
    out = ["<table><thead><tr><th>cohort</th>"]
    out += [f"<th>{r.replace('_', ' ')} risk [95% CI]</th>" for r in risks]
    out.append("</tr></thead><tbody>")
    for name in order:
        cells = []
        for r in risks:
            row = rows[name]
            value = row.get(f"anonymeter_{r}")
            if not _finite(value):
                cells.append("<td>-</td>")
                continue
            low, high = row.get(f"anonymeter_{r}_ci_low"), row.get(f"anonymeter_{r}_ci_high")
            cells.append(f'<td class="num">{value:.3f} [{low:.3f}, {high:.3f}]</td>')
        out.append(f"<tr><td>{html.escape(_label(name))}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    if status:
        out.append(f"<p class='small'>{html.escape(status)}</p>")
    return "".join(out)


def strata_html(strata: Mapping[str, Sequence[Mapping]], order: Sequence[str],
                worst: Mapping[str, str]) -> str:
    """Per stratum: real test patients and each cohort's within-stratum JSD (worst bold)."""
    labels = []
    for name in order:
        for s in strata.get(name, []):
            if s["stratum"] not in labels:
                labels.append(s["stratum"])
    out = ["<table><thead><tr><th>age band x sex</th><th>real test patients</th>"]
    out += [f"<th>{html.escape(_label(n))} JSD</th>" for n in order]
    out.append("</tr></thead><tbody>")
    for label in labels:
        n_real = next((s["n_real"] for n in order for s in strata.get(n, [])
                       if s["stratum"] == label), 0)
        cells = []
        for name in order:
            by = {s["stratum"]: s for s in strata.get(name, [])}
            value = format_value(by.get(label, {}).get("jsd"), "f4")
            if worst.get(name) == label:
                value = f"<b>{value}</b>"
            cells.append(f'<td class="num">{value}</td>')
        out.append(f"<tr><td>{html.escape(label)}</td><td class='num'>{n_real:,}</td>"
                   f"{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _meta_html(meta: Mapping) -> str:
    rows = []
    for key, value in meta.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                              for k, v in value.items())
        rows.append(f"<tr><td>{html.escape(str(key))}</td>"
                    f"<td>{html.escape(str(value))}</td></tr>")
    return '<table class="meta">' + "".join(rows) + "</table>"


def render_html(rows: Mapping[str, Mapping[str, float]], cohorts: Mapping[str, Sequence[Patient]],
                test: Sequence[Patient], meta: Mapping,
                targets: Sequence[Target] = RELATIVE_TARGETS,
                details: Mapping | None = None) -> str:
    """The self-contained HTML report (inline CSS, inline base64 PNG figures), opening with
    the verdict (:func:`verdict_html`)."""
    details = details or {}
    order = [n for n in row_order(rows) if n in cohorts]
    ordered = {n: cohorts[n] for n in order}
    source = str(meta.get("source", "unknown source"))
    figures = []
    if ordered:
        breakdown = age_sex_breakdown(ordered, test)
        figures = [
            ("Code prevalence",
             ("Per-visit prevalence of each code, real test split (x) vs cohort (y), log scale; "
              "the dashed line is equality. Codes seen on one side only sit on the axis floor."),
             plot_prevalence(ordered, test, 1)),
            ("Pair prevalence",
             "Per-visit prevalence of each unordered code pair (the bigram R2 compares these).",
             plot_prevalence(ordered, test, 2)),
            ("Visit structure",
             "Codes per visit and visits per patient, share of visits / patients (log scale).",
             plot_histograms(ordered, test)),
            ("Chapters", "Share of code occurrences per ICD-9-CM chapter.",
             plot_chapters(ordered, test)),
            ("Age and sex",
             ("Left: patients per age bin and sex (the strategies are conditioned one-to-one on "
              "the test patients; the floor and baseline are not). Right: how well codes follow "
              "demographics: JSD vs the real test patients of the same group."),
             plot_age_sex(breakdown, order)),
            ("Sequential fidelity",
             ("P(code b in visit t+1 | code a in visit t), real test (x) vs cohort (y), for "
              "codes a with at least 50 real transitions: the sequential R2 compares these."),
             plot_sequential(ordered, test)),
        ]
        if details.get("strata"):
            figures.append((
                "Strata (age band x sex)",
                ("Within-stratum JSD of code frequencies vs the real test patients of the "
                 "same age band and sex (blank: fewer than 30 patients on a side)."),
                plot_strata(details["strata"], order)))
    created = meta.get("created", datetime.now(UTC).isoformat(timespec="seconds"))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>synthehr evaluation: {html.escape(source)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Synthetic patients: evaluation report</h1>",
        f"<p>Source: <b>{html.escape(source)}</b>"
        + (f" &mdash; {html.escape(str(meta['source_citation']))}"
           if meta.get("source_citation") else "")
        + f". Created {html.escape(str(created))}.</p>",
        verdict_html(rows, targets),
        ("<p class='small'>Protocol (DESIGN.md, Evaluation protocol): as many patients as the "
        "test split, conditioned one-to-one on its patients' age and sex, compared with the "
        "test split; privacy against the training split. <i>floor</i>: an equal-sized sample "
        "of real training patients; <i>baseline</i>: visits and codes sampled independently "
        "from training marginals. Both are computed in the same run. Green cells meet the "
        "target, red ones miss it (shown for the references too, for context; the floor is "
        "made of training patients, so its exact-copy rate is 100% and its DCR 0 by "
        "construction). Hover a "
         "metric for its definition; exact definitions are in <code>app/evaluation/</code>."
         "</p>"),
        "<h2>Metrics</h2>", _metrics_table_html(rows, targets),
    ]
    if details.get("utility_task", {}).get("category"):
        task = details["utility_task"]
        parts.append(f"<p class='small'>Utility task: does the patient carry a code of "
                     f"category {html.escape(str(task['category']))} "
                     f"({100 * task['train_share']:.1f}% of training patients), from age, sex "
                     "and the other codes; logistic regression trained on each cohort, AUROC "
                     "on real test.</p>")
    if details.get("strata"):
        parts += ["<h2>Strata</h2>", strata_html(details["strata"], order,
                                                 details.get("stratum_worst", {}))]
    if "anonymeter" in details:
        parts += ["<h2>Anonymeter audit</h2>",
                  ("<p class='small'>Original: training patients; control: real test split; "
                   "each patient flattened to age, sex, visit count and one indicator per "
                   "ICD-9-CM chapter (training/anonymeter_audit.py). Risks are Anonymeter's "
                   "point estimates with 95% confidence intervals.</p>"),
                  anonymeter_html(rows, str(details["anonymeter"].get("status", "")))]
    parts += ["<h2>Run</h2>", _meta_html(meta)]
    for title, caption, png in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><figure>"
                     f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


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
