"""Peak resident memory of a training run: ``synthehr train`` in a child process.

    python bench/memory.py --label uci [--record] -- --source uci \\
        --data ../shared/data/uci-diabetes-130 --out /tmp/m-uci --max-minutes 2 --threads 1

Everything after ``--`` goes to ``synthehr train`` (run from this checkout: ``python -c "from
app.cli import main; main()" train ...``). The peak is the child's ``ru_maxrss``
(``resource.getrusage(RUSAGE_CHILDREN)``, the kernel's high-water mark of the training process,
corpus loading, evaluation, calibration and export included). The row also shows what the
bundle's manifest records: the trainer's own peak (``metrics.peak_rss_mb``, measured before the
ONNX export), the positions, the token budget per batch, epochs run, and what the long-patient
rule did (``long_patients``). ``--record`` appends the row, with the command and the date, to
``bench/memory_results.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "memory_results.md"
HEADER = ("| run | peak RSS (MiB) | trainer's peak before export (MiB) | size | positions | "
          "batch tokens | epochs | train patients | windowed | windows | visits kept | wall |\n"
          "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def run_training(train_args: list[str]) -> tuple[int, float, float]:
    """``(exit code, peak RSS MiB, wall seconds)`` of ``synthehr train TRAIN_ARGS``."""
    command = [sys.executable, "-c", "from app.cli import main; main()", "train", *train_args]
    started = time.perf_counter()
    code = subprocess.call(command, cwd=REPO)
    wall = time.perf_counter() - started
    # Linux reports ru_maxrss in KiB: the largest of the waited-for children (the trainer)
    return code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, wall


def manifest_facts(out: Path) -> dict[str, object]:
    """What the bundle's manifest says about the run (empty where there is no bundle)."""
    path = out / "manifest.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    metrics = manifest.get("metrics") or {}
    run = (manifest.get("run_config") or {}).get("train") or {}
    long = (manifest.get("long_patients") or {}).get("train") or {}
    return {"trainer_peak": metrics.get("peak_rss_mb"),
            "size": (manifest.get("model_choice") or {}).get("size", "?"),
            "positions": (manifest.get("model") or {}).get("max_positions"),
            "batch_tokens": run.get("max_batch_tokens"),
            "epochs": metrics.get("epochs_run"),
            "train_patients": (manifest.get("splits") or {}).get("train_used"),
            "windowed": long.get("patients_windowed", long.get("patients_cut")),
            "windows": long.get("windows", "-"),
            "visits_kept": (f"{long['visits_kept']:,} / {long['visits_total']:,}"
                            if "visits_total" in long else "-")}


def _fmt(value: object) -> str:
    """A table cell: numbers with thousands separators, ``-`` for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of the row")
    parser.add_argument("--record", action="store_true", help=f"append to {RESULTS.name}")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="-- then the arguments of synthehr train (with --out)")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if "--out" not in train_args:
        parser.error("give synthehr train's arguments after --, including --out")
    out = Path(train_args[train_args.index("--out") + 1])
    code, peak, wall = run_training(train_args)
    facts = manifest_facts(out)
    if code != 0 or not facts:
        sys.exit(f"training failed (exit {code}); peak RSS {peak:.0f} MiB")
    cells = [args.label, _fmt(peak), _fmt(facts["trainer_peak"]), facts["size"],
             facts["positions"], facts["batch_tokens"], facts["epochs"],
             facts["train_patients"], facts["windowed"], facts["windows"],
             facts["visits_kept"], f"{wall / 60:.1f} min"]
    row = "| " + " | ".join(_fmt(c) for c in cells) + " |"
    print(HEADER)
    print(row)
    if args.record:
        command = "python bench/memory.py --label " + shlex.quote(args.label) + " -- " + \
            " ".join(shlex.quote(a) for a in train_args)
        with RESULTS.open("a") as handle:
            handle.write(f"\n{dt.date.today().isoformat()}, `{command}`\n\n{HEADER}\n{row}\n")


if __name__ == "__main__":
    main()
