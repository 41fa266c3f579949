"""``synthehr evaluate`` and ``synthehr calibrate``: both reload the corpus a bundle was trained
on (:func:`load_bundle_corpus`) and split it as training did."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.cli import console, fail

__all__ = ["DEFAULT_EVAL_STRATEGIES", "calibrate_command", "evaluate_command",
           "load_bundle_corpus"]

# -- evaluation (the protocol of DESIGN.md, "Evaluation protocol") ----------------------------

DEFAULT_EVAL_STRATEGIES = "plain,cooccurrence,rerank,retrieve_edit"


def _eval_strategies(text: str) -> list[str]:
    from app.decoding.params import STRATEGIES

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise fail("--strategies is empty; choose from " + ", ".join(STRATEGIES))
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise fail(f"unknown strategy {', '.join(repr(s) for s in unknown)}; choose from "
                   f"{', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def _eval_params(text: str | None, strategies: list[str]) -> dict[str, dict]:
    """``--params``: JSON object strategy -> parameters, each validated now (not mid-run)."""
    import json

    from app.decoding.errors import InvalidParametersError
    from app.decoding.params import parse_params

    if not text:
        return {}
    try:
        given = json.loads(text)
    except ValueError as err:
        raise fail(f"--params is not valid JSON: {err}") from None
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise fail('--params wants a JSON object of strategy -> parameters, e.g. '
                   '\'{"rerank": {"candidates": 4}}\'')
    extra = [s for s in given if s not in strategies]
    if extra:
        raise fail(f"--params names {', '.join(map(repr, extra))}, which is not among "
                   f"--strategies ({', '.join(strategies)})")
    try:
        for strategy, values in given.items():
            parse_params(strategy, values)
    except InvalidParametersError as err:
        raise fail(str(err)) from None
    return given


def load_bundle_corpus(manifest: dict, bundle: Path, data: Path | None):
    """The corpus a bundle was trained on, reloaded as its manifest records it (``data.preset``:
    re-simulated with the training seed; else ``data.source`` from ``data.path`` or ``data``),
    checked against the recorded content hash. Raises ``typer.Exit`` with a clear message."""
    info = manifest.get("data") or {}
    source = info.get("source")
    preset = info.get("preset")
    if preset and data is None:
        from training.simulate import PRESETS, simulate_corpus

        if preset not in PRESETS:
            raise fail(f"bundle {bundle}: unknown simulation preset {preset!r}")
        seed = int(((manifest.get("run_config") or {}).get("train") or {}).get("seed") or 0)
        corpus = simulate_corpus(preset, seed=seed).corpus
        where = f"simulated:{preset} (seed {seed})"
    else:
        from training.loaders import DataError, load_corpus

        if preset:  # a simulated corpus written out with `synthehr data simulate`
            source = "generic"
        path = data if data is not None else info.get("path")
        if not source:
            raise fail(f"bundle {bundle}: manifest.json records no data source")
        if path is None:
            raise fail(f"bundle {bundle}: manifest.json records no data path; pass --data")
        path = Path(path)
        if not path.exists():
            recorded = "given with --data" if data is not None else "recorded in the manifest"
            raise fail(f"data not found: {path} ({recorded}, source {source}); pass --data "
                       f"with the {source} data the bundle was trained on")
        try:
            corpus = load_corpus(source, path, date_format=info.get("date_format"))
        except (DataError, ValueError, OSError) as err:
            raise fail(f"cannot load {source} data from {path}: {err}") from None
        where = f"{source}: {path}"
    expected = info.get("content_hash")
    if expected:
        from training.bundle import corpus_hash

        actual = corpus_hash(corpus.patients)
        if actual != expected:
            raise fail(f"the data changed since bundle {bundle} was trained: {where} has "
                       f"content hash {actual[:12]}..., the manifest records "
                       f"{expected[:12]}... ({len(corpus.patients):,} patients now, "
                       f"{info.get('n_patients', '?')} then); evaluate on the same data")
    return corpus, where


def evaluate_command(
    bundle: Annotated[Path, typer.Option(help="Bundle folder, e.g. models/NAME.")],
    strategies: Annotated[str, typer.Option(
        help="Comma-separated decoding strategies.")] = DEFAULT_EVAL_STRATEGIES,
    data: Annotated[Path | None, typer.Option(
        help="Data folder or file (default: the path recorded in the manifest).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Report folder (default: reports/<bundle name>).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the run (generation, floor, "
                                           "baseline, MIA sample).")] = 0,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads.")] = 1,
    mia_size: Annotated[int | None, typer.Option(
        help="Members and non-members of the membership-inference attack (default: as many "
             "as the test split).")] = None,
    params: Annotated[str | None, typer.Option(
        help='Decoding parameters per strategy as JSON, e.g. \'{"rerank": {"candidates": '
             '4}}\'.')] = None,
    batch_size: Annotated[int, typer.Option(help="Rows decoded together.")] = 64,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    targets: Annotated[str, typer.Option(
        help="Target profile: relative (against this run's floor and baseline) or uci "
             "(UCI's absolute numbers).")] = "relative",
    anonymeter: Annotated[bool, typer.Option(
        help="Run the Anonymeter audit (needs scripts/audit_venv.sh or anonymeter "
             "installed).")] = True,
    anonymeter_python: Annotated[Path | None, typer.Option(
        envvar="SYNTHEHR_ANONYMETER_PYTHON",
        help="Interpreter with anonymeter (default: this one if it has it, else "
             ".venv-audit/bin/python).")] = None,
    anonymeter_attacks: Annotated[int, typer.Option(
        help="Attacks per Anonymeter evaluator.")] = 2000,
) -> None:
    """Run the evaluation protocol on a bundle's test split and write report.json/html/md."""
    import os
    import time

    from app.bundle import BundleError, read_manifest

    names = _eval_strategies(strategies)
    strategy_params = _eval_params(params, names)
    from app.evaluation.protocol import TARGET_PROFILES

    if targets not in TARGET_PROFILES:
        raise fail(f"unknown target profile {targets!r}: choose from "
                   + ", ".join(TARGET_PROFILES))
    if anonymeter_attacks < 1:
        raise fail("--anonymeter-attacks must be at least 1")
    if threads < 1:
        raise fail("--threads must be at least 1")
    if not bundle.exists():
        raise fail(f"bundle not found: {bundle}")
    try:
        manifest = read_manifest(bundle)
    except BundleError as err:
        raise fail(str(err)) from None
    started = time.perf_counter()
    corpus, where = load_bundle_corpus(manifest, bundle, data)

    from training.evaluate import run_protocol
    from training.splits import split_patients

    split = split_patients(corpus.patients)
    recorded = manifest.get("splits") or {}
    sizes = split.sizes()
    changed = {k: (recorded[k], v) for k, v in sizes.items() if k in recorded
               and int(recorded[k]) != v}
    if changed:
        raise fail("the split differs from the bundle's: " + ", ".join(
            f"{k} {new:,} now vs {old:,} in the manifest" for k, (old, new) in changed.items())
            + "; evaluate on the data the bundle was trained on")
    # The patients the model saw (a smoke run may train on a seed-determined subsample,
    # training.trainer.subsample): members for the privacy metrics, pool of the floor.
    train = split.train
    used = int(recorded.get("train_used", len(train)) or len(train))
    if 0 < used < len(train):
        import numpy as np

        train_seed = int(((manifest.get("run_config") or {}).get("train") or {})
                         .get("seed") or 0)
        keep = np.sort(np.random.default_rng(train_seed).choice(len(train), size=used,
                                                                replace=False))
        train = [train[i] for i in keep]
    try:
        from app.decoding.engine import Engine

        engine = Engine.from_bundle(bundle, intra_op_threads=threads, batch_size=batch_size)
    except (BundleError, OSError, RuntimeError, ValueError) as err:
        raise fail(f"cannot load bundle {bundle}: {err}") from None
    off = [s for s in names if s in engine.unavailable]
    if off and strategies == DEFAULT_EVAL_STRATEGIES:  # the default list: skip, and say so
        for s in off:
            console.print(f"skipping {s}: {engine.unavailable[s]}")
        names = [s for s in names if s not in off]
        strategy_params = {s: v for s, v in strategy_params.items() if s in names}
    elif off:
        raise fail(f"bundle {bundle}: strategy {off[0]} is not available: "
                   f"{engine.unavailable[off[0]]}; drop it from --strategies")
    if "retrieve_edit" in names and engine.retrieval is None:
        raise fail(f"bundle {bundle} has no retrieval index (train_index.json.gz): drop "
                   "retrieve_edit from --strategies")

    from app.runtime.generation import GenerationService
    from training.evaluate import service_generate_fn

    generate = service_generate_fn(GenerationService.over_engine(engine), strategy_params)

    name = manifest.get("name") or bundle.name
    out_dir = out if out is not None else Path("reports") / bundle.resolve().name
    info = manifest.get("data") or {}
    meta = {"source": info.get("source"), "bundle": str(bundle), "bundle_name": name,
            "bundle_created": manifest.get("created_at"), "data": where,
            "content_hash": info.get("content_hash"),
            "split_sizes": {"train": len(split.train), "val": len(split.val),
                            "test": len(split.test), "train_used": len(train)},
            "params": {s: strategy_params.get(s, {}) for s in names},
            "threads": threads, "batch_size": batch_size, "mia_size": mia_size,
            "cpus": os.cpu_count()}
    console.print(f"evaluating {bundle} on {where}: test {len(split.test):,} patients, "
                  f"train {len(train):,}; strategies {', '.join(names)}", highlight=False)
    from app.decoding.errors import InvalidParametersError, PrivacyGuardError

    try:
        result = run_protocol(split.test, train, generate_fn=generate, strategies=names,
                              out_dir=out_dir, meta=meta, seed=seed, mia_size=mia_size,
                              console=console, progress=progress, targets=targets,
                              anonymeter=anonymeter, anonymeter_python=anonymeter_python,
                              anonymeter_attacks=anonymeter_attacks)
    except (InvalidParametersError, PrivacyGuardError) as err:
        raise fail(str(err)) from None
    console.print(f"wrote {', '.join(str(p) for p in result.paths.values())} in "
                  f"{time.perf_counter() - started:.0f} s", highlight=False)



def calibrate_command(
    bundle: Annotated[Path, typer.Option(help="Bundle folder to (re)calibrate.")],
    data: Annotated[Path | None, typer.Option(
        help="Data the bundle was trained on (default: the path in its manifest).")] = None,
    patients: Annotated[int, typer.Option(help="Validation demographics in the sample.")] = 8000,
    threads: Annotated[int, typer.Option(help="Torch threads.")] = 1,
    temperatures: Annotated[str, typer.Option(
        help="Sampling temperatures to try on validation, e.g. '1,0.95,0.9': the first is "
             "kept unless another wins by a margin ('1': the stop offsets only).")] = "1",
) -> None:
    """Fit the bundle's calibration on the validation split's demographics: the stop offsets
    (visits per patient, codes per visit, against the training split's histograms) and the
    sampling temperature. Training does this by itself; use it for a bundle trained without
    it, or to refit."""
    from app.bundle import BundleError, read_manifest

    try:
        manifest = read_manifest(bundle)
    except BundleError as err:
        raise fail(str(err)) from None
    corpus, _ = load_bundle_corpus(manifest, bundle, data)
    from training.calibrate import calibrate_bundle
    from training.splits import split_patients

    split = split_patients(corpus.patients)
    seed = int(((manifest.get("run_config") or {}).get("train") or {}).get("seed") or 0)
    try:
        tried = [float(t) for t in temperatures.split(",") if t.strip()]
    except ValueError:
        raise fail(f"--temperatures: not a comma-separated list of numbers: {temperatures!r}") \
            from None
    if not tried or not all(0.0 < t <= 10.0 for t in tried):
        raise fail(f"--temperatures: each must be in (0, 10], got {temperatures!r}")
    calibrate_bundle(bundle, split.val, split.train, patients=patients, seed=seed,
                     threads=threads, temperatures=tried,
                     log=lambda m: typer.echo(m, err=True))
    typer.echo(f"stop calibration written to {bundle}/calibration.json")

