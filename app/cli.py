"""The ``synthehr`` command.

Serving-side commands need neither torch nor the training package; offline commands import
``training`` inside their function bodies, so ``synthehr --help`` works in the serving image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.corpus import Corpus, corpus_stats

app = typer.Typer(help="Synthetic EHR patients: data, training, evaluation and serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Load, inspect and simulate patient corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def print_corpus_report(corpus: Corpus, title: str) -> None:
    """The ``data stats`` report: raw counts, corpus summary, demographics and drops."""
    stats = corpus_stats(corpus.patients)
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for name, value in corpus.raw_counts.items():
        table.add_row(f"read: {name}", f"{value:,}")
    rows = [
        ("patients", f"{stats.patients:,}"),
        ("visits", f"{stats.visits:,}"),
        ("code occurrences", f"{stats.codes:,}"),
        ("distinct codes", f"{stats.distinct_codes:,}"),
        ("mean codes per visit", f"{stats.mean_codes_per_visit:.2f}"),
        ("max codes per visit", f"{stats.max_codes_per_visit}"),
        ("mean visits per patient", f"{stats.mean_visits_per_patient:.3f}"),
        ("mean age at first visit", f"{stats.age_mean:.1f}"),
    ]
    rows += [(f"age {label}", f"{count:,}") for label, count in stats.age_bins.items()]
    rows += [(f"sex {sex}", f"{count:,}") for sex, count in stats.sex.items()]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    drops = Table(title=f"dropped ({corpus.drops.total:,} in all)", header_style="bold")
    drops.add_column("reason")
    drops.add_column("count", justify="right")
    drops.add_column("first examples")
    for reason, count in corpus.drops.counts.most_common():
        drops.add_row(reason, f"{count:,}", "; ".join(corpus.drops.examples.get(reason, [])))
    console.print(drops)


@data_app.command("stats")
def data_stats(
    path: Annotated[Path | None, typer.Argument(
        help="Folder (MIMIC, eICU) or file (UCI, generic); omit with --preset.")] = None,
    source: Annotated[str, typer.Option(help="mimic3, mimic4, eicu, uci or generic.")] = "generic",
    preset: Annotated[str | None, typer.Option(
        help="Describe a simulated corpus instead: demo or mimic3-scale.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulated corpus.")] = 0,
) -> None:
    """Load a source and print patients, visits, codes, demographics and drops by reason."""
    from training.cli_train import load_training_corpus
    from training.loaders import DataError

    if (path is None) == (preset is None):
        raise fail("give a PATH (with --source) or --preset, not both")
    try:
        corpus = load_training_corpus(None if preset else source, path, preset, seed)
    except (DataError, ValueError) as err:
        raise fail(str(err)) from None
    print_corpus_report(corpus, f"preset {preset} (seed {seed})" if preset else f"{source}: {path}")


def _parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


@app.command("train")
def train_command(
    out: Annotated[Path, typer.Option("--out", help="Bundle folder, e.g. models/NAME.")],
    source: Annotated[str | None, typer.Option(help="mimic3, mimic4, eicu, uci or generic.")] = None,
    data: Annotated[Path | None, typer.Option(help="Folder or file of the source.")] = None,
    preset: Annotated[str | None, typer.Option(
        help="Train on a simulated corpus instead: demo or mimic3-scale.")] = None,
    size: Annotated[str, typer.Option(help="Model size: tiny, small or base.")] = "small",
    config: Annotated[Path | None, typer.Option(help="RunConfig JSON (model/objective/train).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override, e.g. --set objective.cooc_weight=0.1 (repeatable).")] = None,
    flat: Annotated[bool, typer.Option(help="Flat softmax over all tokens (ablation).")] = False,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Patients per batch.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of everything random.")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after the epoch that passes "
                                                           "this wall time.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing bundle in OUT.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    export: Annotated[bool, typer.Option(help="Export ONNX graphs when available.")] = True,
) -> None:
    """Train the hierarchical BART on a corpus and write a bundle to OUT."""
    from training.cli_train import run_train

    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--set wants key=value, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    try:
        run_train(out=out, source=source, data=data, preset=preset, size=size, config=config,
                  overrides=overrides, flat=flat, epochs=epochs, batch_size=batch_size,
                  seed=seed, threads=threads, max_minutes=max_minutes, resume=resume,
                  force=force, progress=progress, export=export)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        raise fail(str(err)) from None


@app.command("info")
def info_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder, e.g. models/NAME.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file's checksum.")] = True,
) -> None:
    """Print a bundle's manifest: model, data, splits, training metrics, files."""
    import json

    from app.bundle import BundleError, read_manifest, verify_bundle

    try:
        manifest = read_manifest(bundle)
    except BundleError as err:
        raise fail(str(err)) from None
    if as_json:
        print(json.dumps(manifest, indent=2))
    else:
        print_manifest(manifest, str(bundle))
    if verify:
        try:
            verify_bundle(bundle, manifest)
        except BundleError as err:
            raise fail(str(err)) from None
        console.print(f"checksums: all {len(manifest['files'])} files verified")


def print_manifest(manifest: dict, title: str) -> None:
    """The ``info`` report of a bundle manifest."""
    table = Table(title=f"bundle {title}", show_header=False)
    table.add_column("key")
    table.add_column("value")
    model = manifest.get("model", {})
    metrics = manifest.get("metrics", {})
    data = manifest.get("data", {})
    test = metrics.get("test", {})
    rows = [
        ("format", f"{manifest.get('format')} v{manifest.get('format_version')}"),
        ("created", str(manifest.get("created_at"))),
        ("data source", f"{data.get('source')} ({data.get('n_patients', '?')} patients)"),
        ("content hash", str(data.get("content_hash", ""))[:16]),
        ("splits", ", ".join(f"{k} {v:,}" for k, v in manifest.get("splits", {}).items())),
        ("vocabulary", ", ".join(f"{k} {v:,}" for k, v in manifest.get("vocabulary", {}).items())),
        ("model", (f"{'hierarchical' if model.get('hierarchical') else 'flat'} BART, "
                   f"d={model.get('d_model')}, {model.get('encoder_layers')}+"
                   f"{model.get('decoder_layers')} layers, "
                   f"{manifest.get('n_parameters', 0):,} parameters")),
        ("epochs", (f"{metrics.get('epochs_run')} (best {metrics.get('best_epoch')}, "
                    f"stopped by {metrics.get('stopped_by')})")),
        ("val ppl/code", _fmt(metrics.get("val", {}).get("ppl_code"))),
        ("test ppl/code", (f"{_fmt(test.get('ppl_code_from_demographics'))} from "
                           f"demographics, {_fmt(test.get('ppl_code_from_full_patient'))} from "
                           "the full patient")),
        ("training time", (f"{_fmt((metrics.get('wall_seconds') or 0) / 60)} min on "
                           f"{metrics.get('threads')} threads, peak RSS "
                           f"{_fmt(metrics.get('peak_rss_mb'), 0)} MiB")),
    ]
    rows += [(f"file {name}", sha[:16]) for name, sha in manifest.get("files", {}).items()]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@data_app.command("simulate")
def data_simulate(
    out: Annotated[Path, typer.Option("--out", help="Output file: .csv, .csv.gz or .parquet "
                                                    "(generic long format).")],
    preset: Annotated[str, typer.Option(help="demo (2,000 patients) or mimic3-scale "
                                             "(46,520 patients).")] = "demo",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same "
                                           "corpus.")] = 0,
    clusters_out: Annotated[Path | None, typer.Option(
        "--clusters-out", help="Ground-truth clusters JSON (default: <out stem>.clusters.json "
                               "beside the output).")] = None,
) -> None:
    """Simulate a corpus with known comorbidity clusters and write it in the generic format."""
    from training.simulate import PRESETS, default_clusters_path, simulate_corpus, write_generic

    if preset not in PRESETS:
        raise fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    simulated = simulate_corpus(preset, seed=seed)
    clusters_path = clusters_out if clusters_out is not None else default_clusters_path(out)
    target = out
    try:
        write_generic(simulated.corpus, out, seed=seed)
        target = clusters_path
        clusters_path.parent.mkdir(parents=True, exist_ok=True)
        clusters_path.write_text(simulated.clusters_to_json(), encoding="utf-8")
    except OSError as err:
        reason = err.strerror or str(err)
        if err.filename and str(err.filename) != str(target):
            reason += f" ({err.filename})"
        raise fail(f"cannot write {target}: {reason}") from None
    print_corpus_report(simulated.corpus, f"simulated:{preset} (seed {seed}) -> {out}")
    console.print(f"{len(simulated.clusters)} ground-truth clusters -> {clusters_path}; "
                  f"simulated in {simulated.build_seconds:.1f} s", highlight=False)


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
            corpus = load_corpus(source, path)
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


@app.command("evaluate")
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
    from app.metrics import TARGET_PROFILES

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
    if "retrieve_edit" in names and engine.retrieval is None:
        raise fail(f"bundle {bundle} has no retrieval index (train_index.json.gz): drop "
                   "retrieve_edit from --strategies")

    def generate(strategy, demographics, seed, *, validity_mask=True):
        return engine.generate(demographics, strategy, params=strategy_params.get(strategy),
                               seed=seed, validity_mask=validity_mask).patients

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


# -- serving (no torch: these work in the serving image) ---------------------------------------

def _service_settings(bundle: Path | None, redis_url: str | None):
    """Settings from the environment with the command line's options on top; logging set up."""
    from app.service.logs import configure_logging
    from app.settings import Settings

    overrides: dict[str, object] = {}
    if bundle is not None:
        overrides["bundle"] = bundle
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.json_logs)
    return settings


@app.command("serve")
def serve_command(
    bundle: Annotated[Path | None, typer.Option(help="Bundle folder (default: SYNTHEHR_BUNDLE "
                                                     "or models/demo).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    redis_url: Annotated[str | None, typer.Option(
        help="Job store (default: REDIS_URL; none: embedded store and in-process worker).")
    ] = None,
) -> None:
    """Serve the REST API (uvicorn) with /docs, /redoc, /health, /ready and /metrics."""
    import uvicorn

    from app.service.api import create_app

    settings = _service_settings(bundle, redis_url)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None,
                log_level=settings.log_level.lower(), access_log=False)


@app.command("worker")
def worker_command(
    bundle: Annotated[Path | None, typer.Option(help="Bundle folder (default: SYNTHEHR_BUNDLE "
                                                     "or models/demo).")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Job store (default: REDIS_URL).")
                         ] = None,
) -> None:
    """Run a cohort worker against Redis until SIGTERM/SIGINT."""
    import signal
    import threading

    from app.service.generation import load_generator
    from app.service.store import RedisStore
    from app.service.worker import Worker

    settings = _service_settings(bundle, redis_url)
    if not settings.redis_url:
        raise fail("the worker needs a Redis job store: set REDIS_URL (without one, "
                   "`synthehr serve` runs its own in-process worker)")
    try:
        generator = load_generator(settings.bundle, settings.ort_threads)
    except (ValueError, OSError, RuntimeError) as err:
        raise fail(f"cannot load bundle {settings.bundle}: {err}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Worker(RedisStore(settings.redis_url, settings.key_prefix), generator, settings).run(stop)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
