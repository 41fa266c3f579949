"""The protocol's two reference rows on a real source: the floor (an equal-sized sample of real
training patients) and the independent-marginals baseline, scored against the test split.

    .venv/bin/python bench/reference_rows.py                       # UCI, seed 0
    .venv/bin/python bench/reference_rows.py --seeds 0,1,2,3,4     # spread over seeds
    .venv/bin/python bench/reference_rows.py --out reports/reference-uci   # + report files
    .venv/bin/python bench/reference_rows.py --anonymeter       # + the Anonymeter audit

Reads ``../shared/data/uci-diabetes-130`` (relative to the project root) by default and exits
with a message where it is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console

from training.evaluate import evaluate_cohorts, load_split, protocol_cohorts, run_protocol

DEFAULT_DATA = {"uci": ROOT.parent / "shared" / "data" / "uci-diabetes-130",
                "eicu": ROOT.parent / "shared" / "data" / "eicu-demo",
                "mimic3": ROOT.parent / "shared" / "data" / "mimic3-demo"}
HEADLINE = ("jsd", "top100_overlap", "unigram_r2", "bigram_r2", "cooccurrence_score",
            "exact_copy_rate", "dcr_mean", "mia_auc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="uci")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: print the spread of the headline metrics")
    parser.add_argument("--out", type=Path, default=None, help="write report files here")
    parser.add_argument("--anonymeter", action="store_true",
                        help="add the Anonymeter audit (scripts/audit_venv.sh)")
    args = parser.parse_args(argv)
    console = Console()
    data = args.data or DEFAULT_DATA.get(args.source)
    if data is None or not Path(data).exists():
        console.print(f"[yellow]skipped:[/] no data at {data} (see ../shared/data/README.md)")
        return 0
    started = time.perf_counter()
    split = load_split(args.source, data)
    console.print(f"{args.source}: {data} -> train {len(split.train):,}, "
                  f"test {len(split.test):,} patients ({time.perf_counter() - started:.1f}s)")
    result = run_protocol(split.test, split.train, out_dir=args.out, seed=args.seed,
                          meta={"source": args.source, "data": str(data)}, console=console,
                          progress=False, anonymeter=args.anonymeter)
    console.print(f"protocol run: {result.seconds:.1f}s")
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
        values: dict[str, dict[str, list[float]]] = {}
        for seed in seeds:
            cohorts = protocol_cohorts(split.test, split.train, seed=seed, progress=False)
            rows = evaluate_cohorts(cohorts, split.test, split.train, seed=seed)
            for name, row in rows.items():
                for key in HEADLINE:
                    values.setdefault(name, {}).setdefault(key, []).append(row[key])
        console.print(f"spread over seeds {seeds} (mean ± sd, min..max):")
        for name, metrics in values.items():
            for key, vs in metrics.items():
                a = np.array(vs)
                sd = a.std(ddof=1) if a.size > 1 else 0.0
                console.print(f"  {name:9s} {key:20s} {a.mean():9.4f} ± {sd:.4f}"
                              f"   {a.min():.4f}..{a.max():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
