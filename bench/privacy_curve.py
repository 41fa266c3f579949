"""The fidelity-privacy curve: train one bundle per epsilon (and one without DP) under the same
time budget, evaluate each with the protocol, print one markdown table.

    python bench/privacy_curve.py --source uci --data ../shared/data/uci-diabetes-130 \\
        --epsilons 1,3,8,none --max-minutes 40 --dp-epochs 6 [--jobs 2]
    # a smoke run of the whole pipeline in a few minutes (not the UCI curve):
    python bench/privacy_curve.py --preset demo --size tiny --epsilons 8,none --max-minutes 1 \\
        --dp-epochs 1 --set train.max_train_patients=600

Each point runs ``synthehr train`` (``--dp-epsilon E`` for a DP point; the noise is calibrated
to ``--dp-epochs`` epochs, so set it to what fits in ``--max-minutes``, else the budget is not
spent) and ``synthehr evaluate --strategies plain``, then reads ``report.json``: bigram and
unigram R2, JSD, membership-inference AUC, and the Anonymeter risks where the report has them.
Bundles go to ``--out-dir``/``eps-<E>`` (or ``no-dp``), reports beside them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [("bigram_r2", "bigram R2"), ("unigram_r2", "unigram R2"), ("jsd", "JSD"),
           ("mia_auc", "MIA AUC")]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


RISKS = (("anonymeter_singling_out", "singling out"), ("anonymeter_linkability", "linkability"),
         ("anonymeter_inference", "inference"))


def _risks(row: dict) -> str:
    """The Anonymeter risks of a report row, each with its confidence interval."""
    found = [f"{label} {row[key]:.3f} [{row.get(key + '_ci_low', float('nan')):.3f}, "
             f"{row.get(key + '_ci_high', float('nan')):.3f}]"
             for key, label in RISKS if isinstance(row.get(key), (int, float))]
    return "; ".join(found) if found else "not in report"


def run_point(eps: str, args: argparse.Namespace) -> dict:
    name = "no-dp" if eps == "none" else f"eps-{eps}"
    out = Path(args.out_dir) / name
    train = _cli("train", "--out", str(out), "--size", args.size, "--threads",
                 str(args.threads), "--max-minutes", str(args.max_minutes), "--no-progress",
                 "--force", "--seed", str(args.seed))
    train += ["--preset", args.preset] if args.preset else ["--source", args.source, "--data",
                                                           args.data]
    if eps != "none":
        train += ["--dp-epsilon", eps, "--epochs", str(args.dp_epochs)]
    elif args.epochs:
        train += ["--epochs", str(args.epochs)]
    for item in args.set or []:
        train += ["--set", item]
    started = time.perf_counter()
    subprocess.run(train, cwd=ROOT, check=True)
    train_min = (time.perf_counter() - started) / 60
    report_dir = Path(args.out_dir) / f"report-{name}"
    subprocess.run(_cli("evaluate", "--bundle", str(out), "--strategies", "plain", "--out",
                        str(report_dir), "--no-progress", "--seed", str(args.seed)),
                   cwd=ROOT, check=True)
    return read_point(name, Path(args.out_dir), train_min)


def read_point(name: str, out_dir: Path, train_min: float | None) -> dict:
    """A point's row from its bundle's manifest and its report (``out_dir``/``name`` and
    ``out_dir``/report-``name``)."""
    report = json.loads((out_dir / f"report-{name}" / "report.json").read_text())
    manifest = json.loads((out_dir / name / "manifest.json").read_text())
    dp = (manifest.get("privacy") or {}).get("differential_privacy") or {}
    row = report["rows"]["plain"]
    return {"point": name, "epsilon": dp.get("epsilon"), "noise": dp.get("noise_multiplier"),
            "epochs": manifest["metrics"].get("epochs_run"),
            "stopped_by": manifest["metrics"].get("stopped_by"), "train_min": train_min,
            "codes": manifest["vocabulary"]["codes"],
            **{k: row.get(k) for k, _ in COLUMNS}, "anonymeter": _risks(row)}


def table(rows: list[dict]) -> str:
    head = ["point", "epsilon spent", "noise mult.", "epochs (stopped by)", "train min",
            "codes", *[label for _, label in COLUMNS], "Anonymeter risks"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        def f(v, d=3):
            return "-" if v is None else f"{v:.{d}f}"
        lines.append("| " + " | ".join([
            r["point"], f(r["epsilon"], 2), f(r["noise"], 3),
            f"{r['epochs']} ({r['stopped_by']})", f(r["train_min"], 1), str(r["codes"]),
            *[f(r[k], 4 if k == "jsd" else 3) for k, _ in COLUMNS], r["anonymeter"]]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source")
    parser.add_argument("--data")
    parser.add_argument("--preset")
    parser.add_argument("--size", default="small")
    parser.add_argument("--epsilons", default="1,3,8,none")
    parser.add_argument("--max-minutes", type=float, default=40.0)
    parser.add_argument("--dp-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=0, help="non-DP point (0: default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", help="training override, repeatable")
    parser.add_argument("--out-dir", default="models/privacy-curve")
    parser.add_argument("--jobs", type=int, default=1,
                        help="points trained at the same time (give each a core)")
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of the points already in --out-dir (no training)")
    args = parser.parse_args()
    if args.table_only:
        out_dir = Path(args.out_dir)
        recorded = {r["point"]: r for r in json.loads((out_dir / "curve.json").read_text())}
        print(table([read_point(name, out_dir, recorded[name].get("train_min"))
                     for name in recorded]))
        return
    if not args.preset and not (args.source and args.data):
        parser.error("give --preset or --source and --data")
    points = [eps.strip() for eps in args.epsilons.split(",") if eps.strip()]
    # points side by side (one thread each): the same machine and hours for every point
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda eps: run_point(eps, args), points))
    print(table(rows))
    (Path(args.out_dir) / "curve.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
