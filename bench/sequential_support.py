"""The sequential R2's support threshold on UCI: the real floor and the independent-marginals
baseline scored at several ``min_support`` values (app/evaluation/breakdown.py explains the
default).

    .venv/bin/python bench/sequential_support.py [--seed 1] [--supports 10,30,50,100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.evaluation.breakdown import sequential_r2
from app.evaluation.protocol import independent_marginals_sampler, real_floor_sample
from training.evaluate import load_split

DATA = ROOT.parent / "shared" / "data" / "uci-diabetes-130"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--supports", default="10,30,50,100")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"skipped: no data at {args.data}")
        return 0
    split = load_split("uci", args.data)
    n = len(split.test)
    floor = real_floor_sample(split.train, n, args.seed)
    baseline = independent_marginals_sampler(split.train, n, seed=args.seed)
    print(f"test transitions: {sum(len(p.visits) - 1 for p in split.test):,}")
    print("min_support  floor  baseline")
    for m in (int(x) for x in args.supports.split(",")):
        print(f"{m:11d}  {sequential_r2(split.test, floor, m):5.3f}  "
              f"{sequential_r2(split.test, baseline, m):8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
