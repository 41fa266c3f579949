"""Run Anonymeter's three evaluators on tables written by :mod:`training.anonymeter_audit`.

A standalone script (no project imports): it runs in whatever interpreter has ``anonymeter``,
which may be a virtual environment of its own (``scripts/audit_venv.sh``), because anonymeter
1.1.0 requires ``numpy<1.27`` and ``pyarrow<22`` while the project's environment carries
numpy 2 (see README, "Anonymeter audit").

    python training/anonymeter_runner.py DIR

``DIR`` holds ``ori.csv`` (training records), ``control.csv`` (the real test split),
``syn_<i>.csv`` (one per cohort) and ``job.json`` (``{"cohorts": [...], "n_attacks": N,
"secret": COLUMN, "aux_a": [...], "aux_b": [...], "seed": S}``). It writes ``results.json``:
per cohort, per risk (``singling_out``, ``linkability``, ``inference``), ``{"value",
"ci_low", "ci_high"}``, or ``{"error": message}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _risk(evaluator) -> dict:
    risk = evaluator.risk(confidence_level=0.95)
    low, high = risk.ci
    return {"value": float(risk.value), "ci_low": float(low), "ci_high": float(high)}


def _guarded(fn) -> dict:
    # One evaluator failing (e.g. too few distinct records to single out) must not hide the
    # other two: the report shows the message instead of a number.
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"}


def main(folder: str) -> int:
    import numpy as np
    import pandas as pd
    from anonymeter.evaluators import InferenceEvaluator, LinkabilityEvaluator, SinglingOutEvaluator

    root = Path(folder)
    job = json.loads((root / "job.json").read_text())
    ori = pd.read_csv(root / "ori.csv", dtype={"sex": str})
    control = pd.read_csv(root / "control.csv", dtype={"sex": str})
    n_attacks = int(job["n_attacks"])
    secret = job["secret"]
    aux = [c for c in ori.columns if c != secret]
    results = {}
    for i, name in enumerate(job["cohorts"]):
        # Reseeded per cohort, so a cohort's risks do not depend on which cohorts came before.
        np.random.seed(int(job.get("seed", 0)))
        syn = pd.read_csv(root / f"syn_{i}.csv", dtype={"sex": str})
        attacks = min(n_attacks, len(control), len(syn))
        results[name] = {
            "singling_out": _guarded(lambda syn=syn, attacks=attacks: _risk(
                SinglingOutEvaluator(ori=ori, syn=syn, control=control, n_attacks=attacks)
                .evaluate(mode="univariate"))),
            "linkability": _guarded(lambda syn=syn, attacks=attacks: _risk(
                LinkabilityEvaluator(ori=ori, syn=syn, control=control, n_attacks=attacks,
                                     aux_cols=(job["aux_a"], job["aux_b"]), n_neighbors=10)
                .evaluate(n_jobs=1))),
            "inference": _guarded(lambda syn=syn, attacks=attacks: _risk(
                InferenceEvaluator(ori=ori, syn=syn, control=control, aux_cols=aux,
                                   secret=secret, n_attacks=attacks)
                .evaluate(n_jobs=1))),
        }
        print(f"anonymeter: {name} done", file=sys.stderr, flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
