"""The report's self-contained HTML page (:func:`render_html`): inline CSS, the figures of
:mod:`training.report.plots` as inline base64 PNG, no external file, script or font, so it opens
on a machine with no network. The page opens with the verdict (:func:`verdict_html`), then the
full metrics table (:func:`metrics_table_html`), the strata and Anonymeter tables, the run's
metadata and the figures.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from app.corpus import Patient
from app.evaluation.protocol import RELATIVE_TARGETS, Target
from training.report.plots import (
    age_sex_breakdown,
    plot_age_sex,
    plot_chapters,
    plot_histograms,
    plot_prevalence,
    plot_sequential,
    plot_strata,
)
from training.report.tables import (
    METRICS,
    REFERENCE_LABELS,
    cohort_label,
    format_value,
    is_finite,
    present_metrics,
    row_checks,
    row_order,
    target_text,
    targets_by_metric,
)

__all__ = [
    "anonymeter_html",
    "metrics_table_html",
    "render_html",
    "strata_html",
    "verdict_html",
]

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


def metrics_table_html(rows: Mapping[str, Mapping[str, float]],
                       targets: Sequence[Target]) -> str:
    """Every measured metric down, cohorts across, grouped by section, a target column; a
    cell meeting its target is green, one missing it red; hover a metric for its definition."""
    order = row_order(rows)
    by_metric = targets_by_metric(targets)
    checks = row_checks(rows, targets)
    out = ["<table><thead><tr><th>metric</th>"]
    for name in order:
        cls = ' class="ref"' if name in REFERENCE_LABELS else ""
        out.append(f"<th{cls}>{html.escape(cohort_label(name))}</th>")
    out.append("<th>target</th></tr></thead><tbody>")
    group = None
    for spec in present_metrics(METRICS, rows):
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
    measured = [t for t in targets if any(is_finite(rows[n].get(t.metric)) for n in order)]
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
        out.append(f"<th{cls}>{html.escape(cohort_label(name))}</th>")
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
            if not is_finite(value):
                cells.append("<td>-</td>")
                continue
            low, high = row.get(f"anonymeter_{r}_ci_low"), row.get(f"anonymeter_{r}_ci_high")
            cells.append(f'<td class="num">{value:.3f} [{low:.3f}, {high:.3f}]</td>')
        out.append(f"<tr><td>{html.escape(cohort_label(name))}</td>{''.join(cells)}</tr>")
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
    out += [f"<th>{html.escape(cohort_label(n))} JSD</th>" for n in order]
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
        "<h2>Metrics</h2>", metrics_table_html(rows, targets),
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

