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
    path: Annotated[Path, typer.Argument(help="Folder (MIMIC, eICU) or file (UCI, generic).")],
    source: Annotated[str, typer.Option(help="mimic3, mimic4, eicu, uci or generic.")] = "generic",
) -> None:
    """Load a source and print patients, visits, codes, demographics and drops by reason."""
    from training.loaders import DataError, load_corpus

    try:
        corpus = load_corpus(source, path)
    except (DataError, ValueError) as err:
        raise fail(str(err)) from None
    print_corpus_report(corpus, f"{source}: {path}")


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


# -- serving (no torch: these work in the serving image) ---------------------------------------

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
    from app.service.logs import configure_logging
    from app.settings import Settings

    overrides = {}
    if bundle is not None:
        overrides["bundle"] = bundle
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.json_logs)
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
    from app.service.logs import configure_logging
    from app.service.store import RedisStore
    from app.service.worker import Worker
    from app.settings import Settings

    overrides = {}
    if bundle is not None:
        overrides["bundle"] = bundle
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.json_logs)
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
