"""How much the protocol's headline figures move between generation seeds, for one bundle.

    .venv/bin/python bench/draw_noise.py --bundle models/uci --draws 6 [--data PATH]

The protocol (DESIGN.md) draws one plain cohort, one patient per test patient, with one seed. A
cohort of a few thousand patients is itself a sample: this script draws ``--draws`` such
cohorts with different seeds (the same test demographics, the bundle's ONNX engine, the
validity mask on) and prints each draw's bigram R2, unigram R2, JSD and KS of visits per
patient against the test split, then their mean and standard deviation. Beside them, the same
figures for ``--draws`` real floors (training patients sampled to the test size), so the spread
of the model and the spread of real data are read side by side. Test patients are only scored
against, as in the protocol; nothing here is fitted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from app.bundle import read_manifest
from app.decoding.engine import Engine
from app.evaluation import bigram_r2, code_jsd, ks_visits_per_patient, real_floor_sample, unigram_r2
from training.evaluate import derive_seed, protocol_demographics
from training.loaders import load_corpus
from training.splits import split_patients

METRICS = {"bigram R2": bigram_r2, "unigram R2": unigram_r2, "JSD": code_jsd,
           "KS visits/patient": ks_visits_per_patient}


def _row(label: str, values: dict[str, float]) -> str:
    return f"| {label} | " + " | ".join(f"{values[m]:.4f}" for m in METRICS) + " |"


def _summary(label: str, draws: list[dict[str, float]]) -> list[str]:
    mean = {m: float(np.mean([d[m] for d in draws])) for m in METRICS}
    sd = {m: float(np.std([d[m] for d in draws], ddof=1)) if len(draws) > 1 else 0.0
          for m in METRICS}
    return [_row(f"{label} mean", mean), _row(f"{label} sd", sd)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None,
                        help="the corpus folder (default: the path in the bundle's manifest)")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    data = read_manifest(args.bundle)["data"]
    split = split_patients(load_corpus(data["source"], args.data or data["path"]).patients)
    engine = Engine.from_bundle(args.bundle, intra_op_threads=args.threads)
    demographics = protocol_demographics(split.test)
    print(f"{args.bundle}: {len(split.test):,} test patients, {args.draws} draws each\n")
    print("| draw | " + " | ".join(METRICS) + " |")
    print("| --- |" + " ---: |" * len(METRICS))
    model, floor = [], []
    for draw in range(args.draws):
        cohort = engine.generate(demographics, "plain", seed=derive_seed(draw, "noise")).patients
        model.append({m: f(split.test, cohort) for m, f in METRICS.items()})
        print(_row(f"plain, seed {draw}", model[-1]), flush=True)
    for draw in range(args.draws):
        real = real_floor_sample(split.train, len(split.test), seed=derive_seed(draw, "floor"))
        floor.append({m: f(split.test, real) for m, f in METRICS.items()})
        print(_row(f"floor, seed {draw}", floor[-1]), flush=True)
    print("\n".join(_summary("plain", model) + _summary("floor", floor)))


if __name__ == "__main__":
    main()
