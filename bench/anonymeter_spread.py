"""How much Anonymeter's risks move with the seed on UCI: the floor and baseline audited at
several seeds (training/anonymeter_audit.py explains the choices this informed).

    .venv/bin/python bench/anonymeter_spread.py [--seeds 0,1] [--attacks 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.anonymeter_audit import RISKS, run_audit
from training.evaluate import BASELINE, FLOOR, load_split, protocol_cohorts

DATA = ROOT.parent / "shared" / "data" / "uci-diabetes-130"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--attacks", type=int, default=2000)
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"skipped: no data at {args.data}")
        return 0
    split = load_split("uci", args.data)
    cohorts = protocol_cohorts(split.test, split.train, seed=0, progress=False)
    print("seed  cohort    " + "  ".join(f"{r} [95% CI]" for r in RISKS))
    for seed in (int(s) for s in args.seeds.split(",")):
        started = time.perf_counter()
        rows, status = run_audit({FLOOR: cohorts[FLOOR], BASELINE: cohorts[BASELINE]},
                                 split.train, split.test, n_attacks=args.attacks, seed=seed)
        for name, row in rows.items():
            cells = [f"{row[f'anonymeter_{r}']:.3f} [{row[f'anonymeter_{r}_ci_low']:.3f}, "
                     f"{row[f'anonymeter_{r}_ci_high']:.3f}]" for r in RISKS]
            print(f"{seed:4d}  {name:8s}  " + "  ".join(cells))
        print(f"      ({time.perf_counter() - started:.0f} s; {status})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
