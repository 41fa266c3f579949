"""The report's figures: matplotlib (Agg backend) plots of real test patients against each
cohort, each returned as a base64 PNG for :mod:`training.report.html` to inline, and the age x
sex breakdown (:func:`age_sex_breakdown`) one of them draws.

matplotlib is imported on first use, so importing this module does not need it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np

from app.corpus import AGE_BINS, SEXES, Patient
from app.evaluation.counting import code_counts
from app.evaluation.fidelity import aligned_prevalence, jsd_from_counts, r2_score
from app.icd9.codes import InvalidCodeError
from app.icd9.hierarchy import CHAPTERS, chapter_of
from training.report.tables import cohort_label

__all__ = [
    "age_sex_breakdown",
    "plot_age_sex",
    "plot_chapters",
    "plot_histograms",
    "plot_prevalence",
    "plot_sequential",
    "plot_strata",
]

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


def _panels(plt, n: int, cols: int = 3):
    """``(figure, axes)`` of ``n`` cohort panels, ``cols`` to a row (axes always 2-D)."""
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    return plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)


def plot_prevalence(cohorts: Mapping[str, Sequence[Patient]], test: Sequence[Patient],
                    order_: int) -> str:
    """Real vs synthetic per-visit prevalence of codes (1) or pairs (2), log-log, one panel per
    cohort; zeros are drawn on the axis floor (grey)."""
    plt = _pyplot()
    names = list(cohorts)
    fig, axes = _panels(plt, len(names))
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
        ax.set_title(f"{cohort_label(name)}\nR2 {r2:.3f} over {y.size:,} "
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
                    label=cohort_label(name))
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
                   s=28, zorder=3, label=cohort_label(name))
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
                label=cohort_label(name))
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=60, fontsize=8)
    ax.set_title("patients by age at first visit and sex")
    ax.legend(fontsize=7)
    ax = axes[1]
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        values = np.array(breakdown["jsd"][name], dtype=float)
        ax.bar(pos + j * width - 0.4 + width / 2, np.nan_to_num(values), width=width,
               color=colors[name], label=cohort_label(name))
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
    fig, axes = _panels(plt, len(names))
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
        ax.set_title(f"{cohort_label(name)}\nR2 {r2:.3f} over {y.size:,} (a, b)", fontsize=9)
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
               color=colors[name], label=cohort_label(name))
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=30, fontsize=8)
    ax.set_ylabel("JSD vs real test, within stratum")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)

