"""A finished cohort compared with the loaded bundle's training-split aggregates
(``reference_stats.json`` and the co-occurrence matrix: counts, never records), for
``GET /v1/cohorts/{id}/report``: a JSON document and a self-contained HTML page with inline
SVG charts (no script, no external file).

Compared, cohort vs training split:

- code frequencies: base-2 JSD of the code frequency distributions (visits containing each
  code) and the R2 of per-visit code prevalence, training split as the reference, over the
  union of codes (as :mod:`app.evaluation.fidelity` defines them);
- ICD-9-CM chapter shares of code occurrences;
- visits per patient and codes per visit (shares, and the KS statistic between the two
  histograms);
- age at first visit (the bands of :data:`app.corpus.AGE_BINS`) and sex;
- the top co-occurring pairs: the 15 most frequent pairs of each side, with both sides'
  per-visit prevalence.

The cohort is read once, chunk by chunk; memory grows with its distinct codes and pairs, not
with its patients.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Mapping
from itertools import combinations
from typing import Any

import numpy as np

from app.corpus import AGE_BINS
from app.evaluation.fidelity import jsd_from_counts, r2_score
from app.icd9.codes import InvalidCodeError
from app.icd9.hierarchy import CHAPTERS, chapter_of
from app.service import svg

__all__ = ["TOP_PAIRS", "CohortTally", "compare", "render_html", "tally"]

TOP_PAIRS = 15
_HIST_CAP = 10  # histogram bins 1..10, the last one "10+"


class CohortTally:
    """Counts of one cohort, accumulated patient by patient."""

    def __init__(self) -> None:
        self.n_patients = 0
        self.n_visits = 0
        self.codes: Counter[str] = Counter()
        self.pairs: Counter[tuple[str, str]] = Counter()
        self.codes_per_visit: Counter[int] = Counter()
        self.visits_per_patient: Counter[int] = Counter()
        self.ages: Counter[int] = Counter()
        self.sex: Counter[str] = Counter()

    def add(self, row: Mapping[str, Any]) -> None:
        """One patient as the job store holds it: ``{"age", "sex", "visits": [[code]]}``."""
        self.n_patients += 1
        visits = row["visits"]
        self.visits_per_patient[len(visits)] += 1
        self.ages[int(min(float(row["age"]), 90))] += 1
        self.sex[str(row["sex"])] += 1
        for visit in visits:
            codes = sorted(set(visit))
            self.n_visits += 1
            self.codes_per_visit[len(codes)] += 1
            self.codes.update(codes)
            self.pairs.update(combinations(codes, 2))


def tally(rows: Iterable[Mapping[str, Any]]) -> CohortTally:
    counts = CohortTally()
    for row in rows:
        counts.add(row)
    return counts


def _shares(hist: Mapping, cap: int = _HIST_CAP) -> list[float]:
    values = [0.0] * cap
    for k, n in hist.items():
        values[min(int(k), cap) - 1 if int(k) >= 1 else 0] += float(n)
    total = sum(values)
    return [v / total if total else 0.0 for v in values]


def _ks(a: list[float], b: list[float]) -> float:
    return float(np.max(np.abs(np.cumsum(a) - np.cumsum(b)))) if a else float("nan")


def _chapter_shares(counts: Mapping[str, float]) -> list[float]:
    shares = [0.0] * (len(CHAPTERS) + 1)
    for code, n in counts.items():
        try:
            shares[chapter_of(code).index] += float(n)
        except InvalidCodeError:
            shares[-1] += float(n)
    total = sum(shares)
    return [s / total if total else 0.0 for s in shares]


def _age_shares(hist: Mapping) -> list[float]:
    values = [0.0] * len(AGE_BINS)
    for age, n in hist.items():
        for i, (low, high) in enumerate(AGE_BINS):
            if low <= int(age) < high:
                values[i] += float(n)
                break
    total = sum(values)
    return [v / total if total else 0.0 for v in values]


def _age_label(low: int, high: int) -> str:
    return "0" if (low, high) == (0, 1) else f"{low}-{high - 1}"


def _train_pairs(cooccurrence, codes: list[str]) -> dict[tuple[str, str], int]:
    """The training split's most frequent pairs (upper triangle of the symmetric matrix)."""
    if cooccurrence is None or cooccurrence.nnz == 0:
        return {}
    import scipy.sparse as sp

    upper = sp.triu(cooccurrence, k=1).tocoo()
    order = np.argsort(-upper.data, kind="stable")[:TOP_PAIRS]
    return {tuple(sorted((codes[upper.row[i]], codes[upper.col[i]]))): int(upper.data[i])
            for i in order}


def compare(cohort: CohortTally, reference: Mapping[str, Any], cooccurrence=None
            ) -> dict[str, Any]:
    """The comparison document (module docstring); ``reference`` is the bundle's
    ``reference_stats.json``, ``cooccurrence`` its training co-occurrence matrix (or None)."""
    codes_ref = list(reference.get("codes", []))
    train_counts = dict(zip(codes_ref, reference.get("code_visit_counts", []), strict=False))
    train_visits = max(int(reference.get("n_visits", 0)), 1)
    union = sorted(set(train_counts) | set(cohort.codes))
    p = np.array([train_counts.get(c, 0) for c in union], dtype=np.float64)
    q = np.array([cohort.codes.get(c, 0) for c in union], dtype=np.float64)
    n_visits = max(cohort.n_visits, 1)
    y, yhat = p / train_visits, q / n_visits
    seen = (y > 0) | (yhat > 0)
    cpv_train = _shares(reference.get("codes_per_visit", {}))
    cpv_cohort = _shares(cohort.codes_per_visit)
    vpp_train = _shares(reference.get("visits_per_patient", {}))
    vpp_cohort = _shares(cohort.visits_per_patient)
    sex_train = reference.get("sex", {})
    n_train = max(sum(sex_train.values()), 1)
    index = {c: i for i, c in enumerate(codes_ref)}
    pairs_train = _train_pairs(cooccurrence, codes_ref)
    pairs = list(pairs_train) + [pair for pair, _ in cohort.pairs.most_common(TOP_PAIRS)
                                 if pair not in pairs_train]

    def train_pair(a: str, b: str) -> float:
        if (a, b) in pairs_train:
            return float(pairs_train[(a, b)])
        if cooccurrence is None or a not in index or b not in index:
            return 0.0
        return float(cooccurrence[index[a], index[b]])

    return {
        "reference": {"what": "training-split aggregates of the loaded bundle "
                              "(reference_stats.json, cooccurrence.npz)",
                      "n_patients": int(reference.get("n_patients", 0)),
                      "n_visits": int(reference.get("n_visits", 0))},
        "cohort": {"n_patients": cohort.n_patients, "n_visits": cohort.n_visits,
                   "distinct_codes": len(cohort.codes)},
        "codes": {"jsd": jsd_from_counts(p, q),
                  "unigram_r2": r2_score(y[seen], yhat[seen]) if seen.any() else None,
                  "distinct_train": int(np.count_nonzero(p)),
                  "distinct_cohort": int(np.count_nonzero(q)),
                  "prevalence": [{"code": c, "train": float(a), "cohort": float(b)}
                                 for c, a, b in zip(union, y, yhat, strict=True) if a or b]},
        "chapters": [{"chapter": (CHAPTERS[i].key if i < len(CHAPTERS) else "other"),
                      "title": (CHAPTERS[i].title if i < len(CHAPTERS) else "not ICD-9-CM"),
                      "train": a, "cohort": b}
                     for i, (a, b) in enumerate(zip(_chapter_shares(train_counts),
                                                    _chapter_shares(cohort.codes),
                                                    strict=True)) if a or b],
        "codes_per_visit": {"bins": [str(i) for i in range(1, _HIST_CAP)] + [f"{_HIST_CAP}+"],
                            "train": cpv_train, "cohort": cpv_cohort,
                            "ks": _ks(cpv_train, cpv_cohort)},
        "visits_per_patient": {"bins": [str(i) for i in range(1, _HIST_CAP)]
                               + [f"{_HIST_CAP}+"], "train": vpp_train, "cohort": vpp_cohort,
                               "ks": _ks(vpp_train, vpp_cohort)},
        "age": {"bins": [_age_label(*b) for b in AGE_BINS],
                "train": _age_shares(reference.get("age_years", {})),
                "cohort": _age_shares(cohort.ages),
                "train_mean": reference.get("age_mean")},
        "sex": {"train": {s: sex_train.get(s, 0) / n_train for s in ("F", "M")},
                "cohort": {s: cohort.sex.get(s, 0) / max(cohort.n_patients, 1)
                           for s in ("F", "M")}},
        "top_pairs": [{"pair": [a, b], "train": train_pair(a, b) / train_visits,
                       "cohort": cohort.pairs.get((a, b), 0) / n_visits} for a, b in pairs],
    }


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { border: 1px solid #ddd;
padding: 3px 8px; } td.num { text-align: right; } .small { color: #666; font-size: 0.85em; }
figure { margin: 1em 0; }
"""


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_html(job_id: str, bundle_version: str, doc: Mapping[str, Any]) -> str:
    """The self-contained page: summary table, then the charts (inline SVG)."""
    names = ("training split", "cohort")
    codes = doc["codes"]
    prevalence = codes["prevalence"]
    charts = [
        svg.loglog_scatter("Per-visit code prevalence", [r["train"] for r in prevalence],
                           [r["cohort"] for r in prevalence], x_label="training split",
                           y_label="cohort"),
        svg.grouped_bars("ICD-9-CM chapters (share of code occurrences)",
                         [c["chapter"] for c in doc["chapters"]],
                         {names[0]: [c["train"] for c in doc["chapters"]],
                          names[1]: [c["cohort"] for c in doc["chapters"]]}),
        svg.grouped_bars("Visits per patient", doc["visits_per_patient"]["bins"],
                         {names[0]: doc["visits_per_patient"]["train"],
                          names[1]: doc["visits_per_patient"]["cohort"]}),
        svg.grouped_bars("Codes per visit", doc["codes_per_visit"]["bins"],
                         {names[0]: doc["codes_per_visit"]["train"],
                          names[1]: doc["codes_per_visit"]["cohort"]}),
        svg.grouped_bars("Age at first visit", doc["age"]["bins"],
                         {names[0]: doc["age"]["train"], names[1]: doc["age"]["cohort"]}),
        svg.grouped_bars("Sex", ["F", "M"],
                         {names[0]: [doc["sex"]["train"][s] for s in ("F", "M")],
                          names[1]: [doc["sex"]["cohort"][s] for s in ("F", "M")]}),
        svg.grouped_bars("Top co-occurring pairs (per-visit prevalence)",
                         [" + ".join(p["pair"]) for p in doc["top_pairs"]],
                         {names[0]: [p["train"] for p in doc["top_pairs"]],
                          names[1]: [p["cohort"] for p in doc["top_pairs"]]},
                         width=980, y_label="share of visits"),
    ]
    ref, cohort = doc["reference"], doc["cohort"]
    rows = [("patients", f"{ref['n_patients']:,}", f"{cohort['n_patients']:,}"),
            ("visits", f"{ref['n_visits']:,}", f"{cohort['n_visits']:,}"),
            ("distinct codes", f"{codes['distinct_train']:,}", f"{codes['distinct_cohort']:,}")]
    table = "".join(f"<tr><td>{html.escape(a)}</td><td class='num'>{b}</td>"
                    f"<td class='num'>{c}</td></tr>" for a, b, c in rows)
    return "\n".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>cohort {html.escape(job_id[:12])}: report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Cohort {html.escape(job_id[:12])} against the training split</h1>",
        (f"<p>Model {html.escape(bundle_version)}. Compared with the bundle's training-split "
        "aggregates (counts and histograms only; no training record is read).</p>"),
        ("<table><thead><tr><th></th><th>training split</th><th>cohort</th></tr></thead>"
        f"<tbody>{table}</tbody></table>"),
        (f"<p>Code frequency JSD (base 2): <b>{_num(codes['jsd'])}</b>; per-visit prevalence "
        f"R2 (training split as reference): <b>{_num(codes['unigram_r2'], 3)}</b>; KS visits "
        f"per patient {_num(doc['visits_per_patient']['ks'], 3)}, codes per visit "
        f"{_num(doc['codes_per_visit']['ks'], 3)}.</p>"),
        *(f"<figure>{chart}</figure>" for chart in charts),
        "<p class='small'>Grey: training split; blue: this cohort.</p>",
        "</body></html>"])


def respond(job_id: str, record: Mapping[str, str], generator, rows: Iterable[Mapping],
            accept: str):
    """The route's response: JSON when ``accept`` asks for ``application/json``, else the
    HTML page; 503 when the loaded model carries no training-split statistics."""
    from fastapi.responses import HTMLResponse, JSONResponse

    bundle = getattr(generator, "bundle", None)
    reference = getattr(bundle, "reference_stats", None)
    if not reference:
        return JSONResponse(status_code=503, content={
            "detail": "the loaded model carries no training-split statistics "
                      "(reference_stats.json) to compare with"})
    doc = compare(tally(rows), reference, getattr(bundle, "cooccurrence", None))
    loaded = str(getattr(generator, "bundle_version", ""))
    made_by = str(record.get("bundle_version", ""))
    doc = {"id": job_id, "bundle_version": made_by, "reference_bundle_version": loaded,
           "note": ("the cohort follows the demographics its spec asked for, so age and sex "
                    "differ from the training split by design"), **doc}
    if "application/json" in accept.lower():
        return JSONResponse(_finite(doc))
    return HTMLResponse(render_html(job_id, made_by, doc))


def _finite(value):
    """NaN and infinities become null (JSON has neither)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
