"""One ablation table: several bundles of one corpus, each scored as the mean of several draws.

    .venv/bin/python bench/ablation.py --arm shuffle=runs/a --arm frequency=runs/b --draws 4

The arms differ by one config flag each (the table prints the flags that differ between them).
Each arm draws ``--draws`` plain cohorts of the protocol (one patient per test patient on its
age and sex, the bundle's ONNX engine, validity mask on, the seeds of ``bench/draw_noise.py``)
and is scored against the test split; the mean over draws and its standard error are printed
beside the real floor's mean over as many draws, with the training minutes, epochs and selected
epoch from each manifest. A single protocol draw moves bigram R2 by about +-0.006 on UCI
(``bench/fidelity_results.md``), which is why the arms are compared on draw means; seed-to-seed
training noise comes on top and needs several seeds per arm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.bundle import read_manifest
from app.decoding.engine import Engine
from app.evaluation import real_floor_sample
from bench.draw_noise import METRICS
from training.cli.evaluate import load_bundle_corpus
from training.evaluate import derive_seed, protocol_demographics
from training.splits import split_patients

FLAG_SECTIONS = ("model", "objective", "train")
IGNORED_FLAGS = {"train.seed"}  # seeds are shown in their own column


def _flags(manifest: dict) -> dict[str, object]:
    run = manifest.get("run_config", {})
    return {f"{s}.{k}": v for s in FLAG_SECTIONS for k, v in run.get(s, {}).items()}


def _cell(values: list[float]) -> str:
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {float(np.std(values, ddof=1)) / np.sqrt(len(values)):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", required=True, metavar="LABEL=BUNDLE",
                        help="an arm's label and bundle folder (repeat; one corpus)")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--data", type=Path, default=None,
                        help="the corpus folder (default: the path in the first manifest)")
    parser.add_argument("--params", action="append", default=[], metavar="LABEL=JSON",
                        help="plain-strategy parameters of one arm, e.g. a decoding option: "
                             "'two-stage={\"two_stage\": true}' (its bundle may be another "
                             "arm's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    arms = [tuple(a.split("=", 1)) for a in args.arm]
    if any(len(a) != 2 for a in arms):
        parser.error("--arm takes LABEL=BUNDLE")
    params = {}
    for item in args.params:
        label, _, text = item.partition("=")
        params[label] = json.loads(text)
    if len({label for label, _ in arms}) != len(arms):
        parser.error("arm labels must differ")
    manifests = {label: read_manifest(Path(path)) for label, path in arms}
    data = next(iter(manifests.values()))["data"]
    for label, manifest in manifests.items():
        if manifest["data"].get("content_hash") != data.get("content_hash"):
            parser.error(f"arm {label!r} was trained on another corpus")
    first = Path(arms[0][1])
    # as `synthehr evaluate` reloads it: a simulated preset re-simulated, a file source read,
    # the content hash checked
    split = split_patients(load_bundle_corpus(manifests[arms[0][0]], first, args.data)[0].patients)
    demographics = protocol_demographics(split.test)
    flags = {label: _flags(m) for label, m in manifests.items()}
    keys = sorted({k for f in flags.values() for k in f} - IGNORED_FLAGS)
    differing = [k for k in keys if len({repr(f.get(k)) for f in flags.values()}) > 1]
    if params:
        differing.append("params")
        for label, arm_flags in flags.items():
            arm_flags["params"] = json.dumps(params.get(label, {}))
    print(f"{data['source']}: {len(split.test):,} test patients, {args.draws} draws per arm; "
          f"flags that differ: {', '.join(differing) or 'none'}\n")
    header = ["arm", *differing, "seed", *METRICS, "train min", "epochs (planned)", "selected"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for label, path in arms:
        engine = Engine.from_bundle(Path(path), intra_op_threads=args.threads)
        draws = []
        for draw in range(args.draws):
            cohort = engine.generate(demographics, "plain", params.get(label),
                                     seed=derive_seed(draw, "noise")).patients
            draws.append({m: f(split.test, cohort) for m, f in METRICS.items()})
        metrics = manifests[label].get("metrics", {})
        schedule = metrics.get("schedule", {})
        cells = [label, *(str(flags[label].get(k)) for k in differing),
                 str(flags[label].get("train.seed")),
                 *(_cell([d[m] for d in draws]) for m in METRICS),
                 f"{metrics.get('wall_seconds', float('nan')) / 60:.1f}",
                 f"{metrics.get('epochs_run')} ({schedule.get('planned_epochs')})",
                 str(metrics.get("selected_epoch"))]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    floor = []
    for draw in range(args.draws):
        real = real_floor_sample(split.train, len(split.test), seed=derive_seed(draw, "floor"))
        floor.append({m: f(split.test, real) for m, f in METRICS.items()})
    lines.append("| floor (real train sample) | " + " | ".join("" for _ in differing)
                 + (" | " if differing else "") + "- | "
                 + " | ".join(_cell([d[m] for d in floor]) for m in METRICS) + " | | | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
