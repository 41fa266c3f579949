"""Published generators beside ours, on the same split, the same wall-clock budget and the same
protocol (DESIGN.md, "Evaluation protocol"): one table of ours, the peers, the floor and the
baseline, every row scored by :func:`training.evaluate.evaluate_cohorts` in one run.

    .venv/bin/python bench/peers.py --dataset uci --minutes 40 --bundle models/uci
    .venv/bin/python bench/peers.py --dataset mimic3-scale --minutes 40 --bundle models/m3s
    # ours trained at the same time on the other core, read when its export is done:
    synthehr train --preset mimic3-scale --out models/m3s --max-minutes 40 &
    .venv/bin/python bench/peers.py --dataset mimic3-scale --minutes 40 --bundle models/m3s \
        --wait-minutes 30
    .venv/bin/python bench/peers.py --dataset uci --minutes 1 --subsample 3000 --test-size 500

Peers:

- **HALO**: no package on the registries these machines reach ships it (PyHealth 1.1.6 and
  2.0a13 have no generative models; PyHealth 2.1.0 is not installable here), so the peer is
  ``bench/halo_peer.py``, the paper's architecture in torch (4 layers x 256 by default, one
  thread), trained for ``--minutes`` on the training split (or ``--subsample`` of it) and
  conditioned on each test patient's sex and age band.
- **PromptEHR** (``promptehr`` 0.0.6): installed with ``transformers==4.25.1`` into a venv of
  its own (``--peer-venv``, default ``bench/.peers-venv``; it reuses this environment's torch
  through a ``.pth`` file). It loads the ``facebook/bart-base`` configuration and tokenizer from
  the model hub at construction, which these machines cannot reach: the script runs that step
  offline and records the exact error instead of a row. It is also not a generator from
  demographics as shipped (DESIGN.md): it copies half of each real visit's codes.

Ours: the bundle given with ``--bundle`` (``plain`` decoding), whose training wall time is read
from its manifest; the script does not train ours. ``--out`` appends the table, the command and
what could not run to a markdown file (default ``bench/peers_results.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.evaluate import (
    BASELINE,
    FLOOR,
    evaluate_cohorts,
    load_split,
    protocol_cohorts,
    protocol_demographics,
)
from training.report.tables import markdown_table

DATA = {"uci": ROOT.parent / "shared" / "data" / "uci-diabetes-130"}
TABLE = ("jsd", "top100_overlap", "unigram_r2", "bigram_r2", "sequential_r2", "tail_jsd",
         "tail_distinct_codes", "stratum_jsd_worst", "detection_auc", "tstr_auroc",
         "over_length_visits", "well_formed", "exact_copy_rate", "mia_auc",
         "attr_inference_f1")
PROMPTEHR_PINS = ("promptehr==0.0.6", "transformers==4.25.1")
PROMPTEHR_PROBE = textwrap.dedent("""
    import os, sys, traceback
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
        from promptehr import PromptEHR
        model = PromptEHR(epoch=1, batch_size=16, device="cpu")
        print("PROMPTEHR_OK transformers", transformers.__version__)
    except BaseException as err:
        line = f"{type(err).__name__}: {err}".splitlines()[0][:400]
        print("PROMPTEHR_FAILED", line)
""")


def _split(dataset: str, data: Path | None):
    if dataset == "mimic3-scale":
        from training.simulate import simulate_corpus
        from training.splits import split_patients

        return split_patients(simulate_corpus("mimic3-scale").corpus.patients)
    path = data or DATA.get(dataset)
    if path is None or not Path(path).exists():
        raise SystemExit(f"no data for {dataset} at {path}")
    return load_split(dataset, path)


def _wait_for_bundle(bundle: Path, minutes: float, log) -> None:
    """Wait up to ``minutes`` for ``synthehr train`` to finish ``bundle`` (its manifest lists the
    exported decoder, the last step), so ours can train beside the peers, on the same machine
    over the same wall-clock window."""
    manifest = Path(bundle) / "manifest.json"

    def finished() -> bool:
        try:
            return "decoder.onnx" in json.loads(manifest.read_text()).get("files", {})
        except (OSError, ValueError):
            return False

    deadline = time.monotonic() + minutes * 60
    if not finished():
        log(f"waiting up to {minutes:g} min for {bundle} to be exported")
    while not finished():
        if time.monotonic() > deadline:
            raise SystemExit(f"{bundle} was not exported within {minutes:g} minutes")
        time.sleep(10)


def _ours(bundle: Path, demographics, seed: int) -> tuple[list, float, str]:
    from app.bundle import read_manifest
    from app.decoding.engine import Engine

    manifest = read_manifest(bundle)
    engine = Engine.from_bundle(bundle, intra_op_threads=1, batch_size=64)
    started = time.perf_counter()
    patients = []
    for start in range(0, len(demographics), 256):
        chunk = demographics[start:start + 256]
        patients += list(engine.generate(chunk, "plain", seed=seed + start).patients)
    seconds = time.perf_counter() - started
    train_info = (manifest.get("training") or manifest.get("metrics") or {})
    return patients, seconds, json.dumps({k: train_info[k] for k in list(train_info)[:6]
                                          if k != "history"},
                                         default=str)


def _promptehr(venv: Path, log) -> str:
    """Set up the PromptEHR venv and try to construct the model offline; the outcome."""
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=300)
            purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
            site = subprocess.run([str(python), "-c", purelib], check=True,
                                  capture_output=True, text=True).stdout.strip()
            import torch

            # torch (and numpy) from this environment: one CPU torch on the machine, pinned.
            Path(site, "project_torch.pth").write_text(
                str(Path(torch.__file__).resolve().parents[1]) + "\n")
        log("installing " + " ".join(PROMPTEHR_PINS) + " into " + str(venv))
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                               *PROMPTEHR_PINS], capture_output=True, text=True, timeout=1200,
                              check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            return f"pip install {' '.join(PROMPTEHR_PINS)} failed: {tail}"
        probe = subprocess.run([str(python), "-c", PROMPTEHR_PROBE], capture_output=True,
                               text=True, timeout=600, check=False,
                               env={**os.environ, "PYTHONNOUSERSITE": "1"})
        out = (probe.stdout + probe.stderr).strip().splitlines()
        found = [line for line in out if line.startswith("PROMPTEHR_")]
        return found[-1] if found else f"probe exited {probe.returncode}: {out[-1:]}"
    except (subprocess.SubprocessError, OSError) as err:
        return f"could not set up the PromptEHR venv: {err}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="uci", choices=["uci", "mimic3-scale"])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--minutes", type=float, default=40.0,
                        help="wall-clock training budget of each peer")
    parser.add_argument("--bundle", type=Path, default=None, help="our bundle (plain)")
    parser.add_argument("--wait-minutes", type=float, default=0.0,
                        help="wait this long for --bundle to be written (train it alongside)")
    parser.add_argument("--subsample", type=int, default=None,
                        help="train the peers on this many training patients")
    parser.add_argument("--test-size", type=int, default=None,
                        help="score on this many test patients (seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-promptehr", action="store_true")
    parser.add_argument("--peer-venv", type=Path, default=ROOT / "bench" / ".peers-venv")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "peers_results.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    split = _split(args.dataset, args.data)
    rng = np.random.default_rng(args.seed)
    train, test = split.train, split.test
    if args.subsample and args.subsample < len(train):
        train = [train[i] for i in np.sort(rng.choice(len(train), args.subsample, False))]
    if args.test_size and args.test_size < len(test):
        test = [test[i] for i in np.sort(rng.choice(len(test), args.test_size, False))]
    log(f"{args.dataset}: peers train on {len(train):,} patients, test {len(test):,}")
    demographics = protocol_demographics(test)
    notes: list[str] = []
    cohorts: dict[str, list] = {}
    timings: dict[str, float] = {}
    from halo_peer import HaloData, generate_halo, train_halo

    data = HaloData(train)
    log(f"HALO: {data.n_out - 1:,} codes, training {args.minutes:g} min")
    model, info = train_halo(data, train, minutes=args.minutes, seed=args.seed,
                             d_model=args.d_model, layers=args.layers, log=log)
    log(f"HALO trained: {info}")
    t0 = time.perf_counter()
    cohorts["HALO"] = generate_halo(model, data, demographics, seed=args.seed)
    timings["HALO"] = time.perf_counter() - t0
    notes.append(f"HALO (bench/halo_peer.py, {args.layers} x {args.d_model}, one thread): "
                 f"{info['steps']:,} steps, {info['epochs']} full epochs, "
                 f"{info['parameters']:,} parameters in {args.minutes:g} min; given each test "
                 "patient's sex and age band")
    if args.bundle is not None:
        _wait_for_bundle(args.bundle, args.wait_minutes, log)
        patients, seconds, info = _ours(args.bundle, demographics, args.seed)
        cohorts["ours (plain)"] = patients
        timings["ours (plain)"] = seconds
        notes.append(f"ours: bundle {args.bundle}, trained by `synthehr train` (manifest: "
                     f"{info}), not by this script")
    if not args.no_promptehr:
        outcome = _promptehr(args.peer_venv, log)
        log(f"PromptEHR: {outcome}")
        notes.append(f"PromptEHR: {outcome}")
    refs = protocol_cohorts(test, train, seed=args.seed, progress=False)
    cohorts[FLOOR], cohorts[BASELINE] = refs[FLOOR], refs[BASELINE]
    rows = evaluate_cohorts(cohorts, test, train, seed=args.seed, timings=timings)
    table = markdown_table(rows, TABLE)
    print(table)
    for note in notes:
        print("- " + note)
    if args.out:
        command = "python bench/peers.py " + " ".join(argv if argv is not None
                                                      else sys.argv[1:])
        with args.out.open("a") as handle:
            handle.write(f"\n## {args.dataset}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
                         f"`{command}` ({time.perf_counter() - started:.0f} s; peers trained "
                         f"on {len(train):,} patients, scored on {len(test):,} test "
                         "patients; targets: relative profile)\n\n" + table + "\n"
                         + "".join(f"- {n}\n" for n in notes))
        log(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
