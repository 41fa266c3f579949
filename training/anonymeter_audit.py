"""The Anonymeter audit of the evaluation protocol: singling-out, linkability and
attribute-inference risks (Giomi et al., 2023; the ``anonymeter`` package) for every cohort,
with training records as the original data and the real test split as the control set.

Anonymeter works on tables, so each patient is flattened to one row (:func:`flatten`):

=================  ==========================================================================
``age``            age at first visit (years, as in the corpus)
``sex``            ``F`` or ``M``
``n_visits``       number of visits
``ch_<first>``     1 if any of the patient's codes lies in that ICD-9-CM chapter (one column
                   per chapter of :data:`app.icd9.hierarchy.CHAPTERS`, named by its first
                   category, e.g. ``ch_290`` for 290-319), else 0
=================  ==========================================================================

The attacks: singling out in univariate mode; linkability with the auxiliary columns split in
two (demographics and the first half of the chapter columns; the rest), 10 neighbours;
inference, from every other column, of the chapter flag whose share among the original
records is closest to 50% (``ch_240`` on UCI). A rare secret makes Anonymeter's inference risk
useless: the risk divides by one minus the control attack's success, which a majority guess
drives towards 0 (on UCI, with ``ch_290``, mental disorders, carried by 7.7% of training
patients, the floor's point estimate moved between 0.00 and 0.29 with the seed and its 95%
interval spanned up to 0.49). Even with ``ch_240`` (55.7%) and 2000 attacks the inference
risk moves with the seed (``bench/anonymeter_spread.py``, seeds 0-2: floor 0.110, 0.049,
0.112; independent-marginals baseline 0.109, 0.000, 0.006; intervals about 0.14 wide), so one
run's point estimate against 0.05 is a weak verdict: read it beside the floor and baseline rows
and their intervals. Each risk is reported with its 95% confidence interval.
``n_attacks`` (default 2000) is capped by the control and cohort sizes; every cohort is
attacked with the same seed.

anonymeter 1.1.0 declares ``numpy<1.27`` and ``pyarrow<22``; the project's environment has
numpy 2, so the evaluators run in a separate interpreter (``scripts/audit_venv.sh`` makes
``.venv-audit``) through :mod:`training.anonymeter_runner`, or in this one where anonymeter
imports.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from app.corpus import Patient
from app.icd9.codes import InvalidCodeError
from app.icd9.hierarchy import CHAPTERS, chapter_of

__all__ = ["COLUMNS", "RISKS", "choose_secret", "find_python", "flatten", "run_audit"]

CHAPTER_COLUMNS = tuple(f"ch_{c.first}" for c in CHAPTERS)
COLUMNS = ("age", "sex", "n_visits", *CHAPTER_COLUMNS)
RISKS = ("singling_out", "linkability", "inference")
RUNNER = Path(__file__).with_name("anonymeter_runner.py")
AUDIT_VENV = Path(__file__).resolve().parent.parent / ".venv-audit"


def flatten(patients: Sequence[Patient]) -> list[list]:
    """One row per patient in :data:`COLUMNS` order (module docstring)."""
    rows = []
    for p in patients:
        flags = [0] * len(CHAPTERS)
        for visit in p.visits:
            for code in visit:
                try:
                    flags[chapter_of(code).index] = 1
                except InvalidCodeError:
                    pass
        rows.append([float(p.age), p.sex, len(p.visits), *flags])
    return rows


def choose_secret(rows: list[list]) -> str:
    """The chapter column whose share of ``rows`` (flattened) is closest to 50%; ties by
    column order."""
    shares = np.asarray([r[3:] for r in rows], dtype=np.float64).mean(axis=0) if rows else \
        np.zeros(len(CHAPTER_COLUMNS))
    return CHAPTER_COLUMNS[int(np.argmin(np.abs(shares - 0.5)))]


def _write(path: Path, rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def find_python(explicit: str | Path | None = None) -> tuple[str | None, str]:
    """``(interpreter, why)``: ``explicit`` if given, else this interpreter where anonymeter
    imports, else ``.venv-audit/bin/python`` where it exists; None with the reason otherwise."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            return None, f"anonymeter interpreter not found: {path}"
        return str(path), f"anonymeter via {path}"
    if importlib.util.find_spec("anonymeter") is not None:
        return sys.executable, "anonymeter in this environment"
    venv_python = AUDIT_VENV / "bin" / "python"
    if venv_python.exists():
        return str(venv_python), f"anonymeter via {venv_python}"
    return None, ("anonymeter is not installed here (it needs numpy<1.27); run "
                  "scripts/audit_venv.sh to make .venv-audit, or pass --anonymeter-python")


def run_audit(cohorts: Mapping[str, Sequence[Patient]], train: Sequence[Patient],
              test: Sequence[Patient], *, n_attacks: int = 2000, seed: int = 0,
              python: str | Path | None = None, timeout: float = 3600.0
              ) -> tuple[dict[str, dict[str, float]], str]:
    """Every cohort's three risks: ``({cohort: {"anonymeter_<risk>": value, "..._ci_low",
    "..._ci_high"}}, status)``. The original table is a seeded sample of training patients
    as large as the test split. Values are NaN where a risk could not be computed; ``status``
    says how it ran or why not (a failed evaluator's message is in it too)."""
    interpreter, status = find_python(python)
    nan = float("nan")
    empty = {name: {f"anonymeter_{r}{s}": nan for r in RISKS for s in ("", "_ci_low",
                                                                        "_ci_high")}
             for name in cohorts}
    if interpreter is None or not cohorts or not train or not test:
        return empty, status if interpreter is None else "nothing to audit"
    rng = np.random.default_rng([seed, 0x616E6F])  # "ano": a stream of its own
    size = min(len(test), len(train))
    ori = [train[i] for i in np.sort(rng.choice(len(train), size, replace=False))]
    names = list(cohorts)
    half = len(CHAPTER_COLUMNS) // 2
    ori_rows = flatten(ori)
    secret = choose_secret(ori_rows)
    job = {"cohorts": names, "n_attacks": int(n_attacks), "secret": secret, "seed": seed,
           "aux_a": ["age", "sex", "n_visits", *CHAPTER_COLUMNS[:half]],
           "aux_b": list(CHAPTER_COLUMNS[half:])}
    status += f"; inference secret {secret}; {n_attacks} attacks"
    with tempfile.TemporaryDirectory(prefix="anonymeter-") as folder:
        root = Path(folder)
        _write(root / "ori.csv", ori_rows)
        _write(root / "control.csv", flatten(test))
        for i, name in enumerate(names):
            _write(root / f"syn_{i}.csv", flatten(cohorts[name]))
        (root / "job.json").write_text(json.dumps(job))
        done = subprocess.run([interpreter, str(RUNNER), str(root)], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            return empty, f"anonymeter failed (exit {done.returncode}): {tail[0]}"
        results = json.loads((root / "results.json").read_text())
    out = {}
    errors = []
    for name in names:
        row = {}
        for risk in RISKS:
            found = results.get(name, {}).get(risk, {})
            if "error" in found:
                errors.append(f"{name} {risk}: {found['error']}")
            for suffix, key in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high")):
                row[f"anonymeter_{risk}{suffix}"] = float(found.get(key, nan))
        out[name] = row
    if errors:
        status += "; " + "; ".join(errors)
    return out, status
