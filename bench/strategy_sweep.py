"""Decoding-strategy settings swept on the validation split (never test): which setting of each
strategy fits a bundle's corpus best, to choose each strategy's default from.

    python bench/strategy_sweep.py --bundle models/m3s [--patients 0] [--record]

The bundle's corpus is reloaded as its manifest records it (a simulation preset re-simulated
with its seed, or its data path; ``--data`` overrides), split as in training, and every setting
in the grid generates one patient per validation patient (their age and sex, one-to-one; the
same seed for every setting) with the bundle's engine. Each cohort is scored against the
validation patients: bigram and unigram R2, code JSD, and the KS of visits per patient and codes
per visit, plus the selection score of training (``training.fidelity.fidelity_score``: the mean
of the two R2s less half the visits KS). The best setting of each strategy by that score is
marked. ``--grid`` takes a JSON list of ``{"strategy": ..., "params": {...}}`` in place of
the default grid. ``--record`` appends the table, with the command, to
``bench/strategy_sweep_results.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.bundle import read_manifest
from app.decoding.engine import Engine
from app.evaluation import code_jsd
from training.cli.evaluate import load_bundle_corpus
from training.fidelity import cohort_fidelity, validation_subsample
from training.splits import split_patients

RESULTS = ROOT / "bench" / "strategy_sweep_results.md"
# Each strategy's default first (its row is the reference), then the settings that the
# strategies' own documentation names as plausible, including the NPMI bias.
DEFAULT_GRID: list[dict] = [
    {"strategy": "plain", "params": {}},
    {"strategy": "plain", "params": {"temperature": 0.95}},
    {"strategy": "plain", "params": {"temperature": 1.05}},
    {"strategy": "cooccurrence", "params": {}},
    {"strategy": "cooccurrence", "params": {"alpha": 0.05}},
    {"strategy": "cooccurrence", "params": {"alpha": 0.1, "normalize": True}},
    {"strategy": "cooccurrence", "params": {"alpha": 0.25, "bias": "npmi"}},
    {"strategy": "cooccurrence", "params": {"alpha": 0.5, "bias": "npmi"}},
    {"strategy": "cooccurrence", "params": {"alpha": 1.0, "bias": "npmi"}},
    {"strategy": "rerank", "params": {}},
    {"strategy": "rerank", "params": {"coherence_weight": 1.0}},
    {"strategy": "rerank", "params": {"candidates": 8, "coherence_weight": 0.5}},
    {"strategy": "retrieve_edit", "params": {}},
    {"strategy": "retrieve_edit", "params": {"keep_fraction": 0.25}},
]
COLUMNS = ("bigram_r2", "unigram_r2", "jsd", "ks_visits_per_patient", "ks_codes_per_visit",
           "score", "seconds")


def score_cohort(real, cohort) -> dict[str, float]:
    """The sweep's metrics of ``cohort`` against the validation patients ``real``: training's
    selection metrics and score, and the code JSD."""
    return {**cohort_fidelity(real, cohort), "jsd": code_jsd(real, cohort)}


def sweep(bundle: Path, grid: list[dict], patients: int, seed: int, threads: int,
          data: Path | None = None) -> tuple[list[dict], int]:
    """Rows ``{strategy, params, **metrics}`` of every setting in ``grid``, and the number of
    validation patients they were scored on."""
    manifest = read_manifest(bundle)
    corpus, _ = load_bundle_corpus(manifest, bundle, data)
    val = validation_subsample(split_patients(corpus.patients).val, patients, seed)
    demographics = [(float(p.age), p.sex) for p in val]
    engine = Engine.from_bundle(bundle, intra_op_threads=threads, batch_size=64)
    rows = []
    for entry in tqdm(grid, desc="settings", unit="setting"):
        strategy, params = entry["strategy"], dict(entry.get("params") or {})
        if strategy in engine.unavailable:
            rows.append({"strategy": strategy, "params": params,
                         "skipped": engine.unavailable[strategy]})
            continue
        started = time.perf_counter()
        cohort = engine.generate(demographics, strategy, params, seed=seed).patients
        rows.append({"strategy": strategy, "params": params, **score_cohort(val, cohort),
                     "seconds": time.perf_counter() - started})
    return rows, len(val)


def mark_best(rows: list[dict]) -> None:
    """Flag the best-scoring setting of each strategy (``best``)."""
    by_strategy: dict[str, dict] = {}
    for row in rows:
        if "score" not in row:
            continue
        best = by_strategy.get(row["strategy"])
        if best is None or row["score"] > best["score"]:
            by_strategy[row["strategy"]] = row
    for row in rows:
        row["best"] = row is by_strategy.get(row["strategy"])


def markdown(rows: list[dict]) -> str:
    head = ["strategy", "params", "bigram R2", "unigram R2", "JSD", "KS visits/patient",
            "KS codes/visit", "score", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for row in rows:
        params = json.dumps(row["params"], sort_keys=True) if row["params"] else "(default)"
        if "skipped" in row:
            lines.append(f"| {row['strategy']} | {params} | skipped: {row['skipped']} |"
                         + " |" * (len(head) - 3))
            continue
        cells = [f"{row[k]:.4f}" if k == "jsd" else f"{row[k]:.0f}" if k == "seconds"
                 else f"{row[k]:.3f}" for k in COLUMNS]
        name = f"**{row['strategy']}**" if row.get("best") else row["strategy"]
        lines.append(f"| {name} | `{params}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None,
                        help="the bundle's training data, where the manifest's path is stale")
    parser.add_argument("--patients", type=int, default=0,
                        help="validation patients to score on (0: all)")
    parser.add_argument("--grid", type=str, default=None,
                        help="JSON list of {strategy, params} (default: the built-in grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    grid = json.loads(args.grid) if args.grid else DEFAULT_GRID
    started = time.perf_counter()
    rows, n_val = sweep(args.bundle, grid, args.patients, args.seed, args.threads, args.data)
    mark_best(rows)
    table = markdown(rows)
    print(table)
    best = {r["strategy"]: r["params"] for r in rows if r.get("best")}
    print("best on validation:", json.dumps(best, sort_keys=True))
    if args.record:
        command = "python bench/strategy_sweep.py " + shlex.join(
            argv if argv is not None else sys.argv[1:])
        with RESULTS.open("a") as handle:
            handle.write(f"\n## {args.bundle.name}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
                         f"`{command}` ({time.perf_counter() - started:.0f} s; {n_val:,} "
                         f"validation patients; best of each strategy in bold)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
