"""Speed-up of ``synthehr train --nproc 2`` over ``--nproc 1``: the same epoch of UCI.

    .venv/bin/python bench/ddp_speedup.py [--data ../shared/data/uci-diabetes-130]
        [--patients 20000] [--rounds 2] [--nproc 1,2]

Runs ``synthehr train --source uci --data DATA --set train.epochs=1
--set train.max_train_patients=PATIENTS`` once per process count, interleaved over ``--rounds``
rounds (so a change in the machine's load hits both), and prints a markdown table: the seconds
of the epoch's optimizer steps (``history[0].train_seconds`` of the manifest, rank 0's clock:
the same batches and the same number of steps whatever the number of processes), per step,
the command's wall time (startup, loading, validation and the bundle included, which run on
rank 0 only), the children's CPU time, and the load average before and after each run.
Validation is cut to the cheap part (``train.monitor=nll_per_token``, ``train.calibrate=false``)
since it is not what is measured; ``--full`` keeps the recipe's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(nproc: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "app.cli", "train", "--source", "uci", "--data",
           str(args.data), "--out", str(out), "--force", "--no-progress", "--no-export",
           "--nproc", str(nproc), "--set", "train.epochs=1",
           "--set", f"train.max_train_patients={args.patients}"]
    if not args.full:
        cmd += ["--set", "train.monitor=nll_per_token", "--set", "train.calibrate=false"]
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"nproc {nproc}: exit code {proc.returncode}")
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest["metrics"]
    epoch = metrics["history"][0]
    steps = metrics["schedule"]["steps_per_epoch"]
    return {"nproc": nproc, "steps": steps, "train_s": epoch["train_seconds"],
            "per_step_ms": 1000 * epoch["train_seconds"] / steps,
            "train_loss": epoch["train_loss"], "wall_s": wall,
            "cpu_s": (cpu_after.ru_utime - cpu_before.ru_utime)
            + (cpu_after.ru_stime - cpu_before.ru_stime),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data"
                        / "uci-diabetes-130")
    parser.add_argument("--patients", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--full", action="store_true",
                        help="keep the recipe's validation (fidelity sample, calibration)")
    args = parser.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ddp-speedup-"))
    rows = []
    try:
        for round_ in range(1, args.rounds + 1):
            for nproc in counts:
                row = run_once(nproc, args, tmp / f"n{nproc}")
                row["round"] = round_
                rows.append(row)
                print(f"round {round_}, {nproc} process(es): {row['train_s']:.1f}s of steps, "
                      f"wall {row['wall_s']:.0f}s, load {row['load_before']:.1f}",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{os.cpu_count()} cores; {rows[0]['steps']} optimizer steps "
          f"(one epoch of {args.patients} UCI training patients)\n")
    print("| round | processes | steps (s) | per step (ms) | epoch train loss | command wall (s) "
          "| CPU (s) | load avg before / after |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['round']} | {r['nproc']} | {r['train_s']:.1f} | {r['per_step_ms']:.0f} | "
              f"{r['train_loss']:.4f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
              f"{r['load_before']:.2f} / {r['load_after']:.2f} |")
    print()
    by_round = {(r["round"], r["nproc"]): r for r in rows}
    for nproc in counts[1:]:
        # paired by round: the runs of a round are back to back, under about the same load
        steps = [by_round[i, counts[0]]["train_s"] / by_round[i, nproc]["train_s"]
                 for i in range(1, args.rounds + 1)]
        wall = [by_round[i, counts[0]]["wall_s"] / by_round[i, nproc]["wall_s"]
                for i in range(1, args.rounds + 1)]
        print(f"speed-up of {nproc} processes over {counts[0]}, per round (optimizer steps): "
              + ", ".join(f"{x:.2f}x" for x in steps)
              + f"; median {statistics.median(steps):.2f}x. Command wall time: median "
              f"{statistics.median(wall):.2f}x")


if __name__ == "__main__":
    main()
