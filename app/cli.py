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

from app.corpus import Corpus, corpus_stats, length_stats

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


def print_corpus_report(corpus: Corpus, title: str, max_positions: int = 0) -> None:
    """The ``data stats`` report: raw counts, corpus summary, demographics, patient lengths
    against ``max_positions`` (0: the training recipe's) and drops (with level and examples)."""
    stats = corpus_stats(corpus.patients)
    lengths = length_stats(corpus.patients, max_positions or None)
    max_positions = lengths.max_positions
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
    # Token length of a patient: 2 + sum over visits of (codes + 2) (app.corpus.token_length).
    rows += [(f"patient length in tokens, {q}", f"{v:,}")
             for q, v in lengths.token_percentiles.items()]
    share = lengths.over_limit / stats.patients if stats.patients else 0.0
    rows += [("model.max_positions" + (" (the recipe's: p99.9 rounded up to 32, 32-512)"
                                       if lengths.recipe_positions else " (--max-positions)"),
              f"{max_positions:,}"),
             (f"patients longer than {max_positions} tokens",
              f"{lengths.over_limit:,} ({share:.1%})"),
             (f"visits of patients longer than {max_positions} tokens",
              f"{lengths.visits_over_limit:,}"),
             ("windows they train on (every visit kept)", f"{lengths.windows_over_limit:,}")]
    rows += [(f"visits per patient, {q}", f"{v:,}") for q, v in lengths.visit_percentiles.items()]
    rows += [(f"patients with {label} visits", f"{count:,}")
             for label, count in lengths.visit_histogram.items()]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    drops = Table(title=f"dropped ({corpus.drops.total:,} in all; rows are 1-based data rows, "
                        "header excluded)", header_style="bold")
    drops.add_column("reason")
    drops.add_column("level")
    drops.add_column("count", justify="right")
    drops.add_column("first examples", overflow="fold")  # never cut a file name
    for reason, count in corpus.drops.counts.most_common():
        drops.add_row(reason, corpus.drops.levels.get(reason, "row"), f"{count:,}",
                      "; ".join(corpus.drops.examples.get(reason, [])))
    console.print(drops)


@data_app.command("stats")
def data_stats(
    path: Annotated[Path | None, typer.Argument(
        help="Folder (MIMIC, eICU) or file (UCI, generic); omit with --preset.")] = None,
    source: Annotated[str, typer.Option(
        help="mimic3, mimic4, eicu, uci, generic or synpuf.")] = "generic",
    preset: Annotated[str | None, typer.Option(
        help="Describe a simulated corpus instead: demo, mimic3-scale or claims-scale.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulated corpus.")] = 0,
    date_format: Annotated[str | None, typer.Option(
        help="The one format of the source's dates, in strptime codes (e.g. '%m/%d/%Y'); "
             "default ISO 8601 (DE-SynPUF: YYYYMMDD). Dates are never guessed.")] = None,
    max_positions: Annotated[int, typer.Option(
        min=0, help="Report how many patients are longer than this many tokens (0: the "
                    "training recipe's limit, the 99.9th percentile rounded up to 32).")] = 0,
    max_drop_share: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fail when more than this share of patients is dropped.")] = 0.5,
) -> None:
    """Load a source and print patients, visits, codes, demographics, patient lengths and drops
    by reason with examples."""
    from training.cli_train import load_training_corpus
    from training.loaders import DataError, load_corpus

    if (path is None) == (preset is None):
        raise fail("give a PATH (with --source) or --preset, not both")
    try:
        corpus = (load_training_corpus(None, None, preset, seed) if preset else
                  load_corpus(source, path, date_format=date_format,
                              max_drop_share=max_drop_share))
    except (DataError, ValueError) as err:
        raise fail(str(err)) from None
    print_corpus_report(corpus, f"preset {preset} (seed {seed})" if preset else f"{source}: {path}",
                        max_positions)


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
    size: Annotated[str, typer.Option(
        help="Model size: auto (chosen from the corpus), tiny, small or base.")] = "auto",
    config: Annotated[Path | None, typer.Option(help="RunConfig JSON (model/objective/train).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override, e.g. --set objective.cooc_weight=0.1 (repeatable).")] = None,
    flat: Annotated[bool, typer.Option(help="Flat softmax over all tokens (ablation).")] = False,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Patients per batch.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of everything random.")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="Time budget: epochs and the learning-rate schedule are planned to end annealed "
             "within it (default: chosen from the corpus).")] = None,
    device: Annotated[str | None, typer.Option(
        help="cpu (default) or cuda (a CUDA GPU, where torch sees one).")] = None,
    date_format: Annotated[str | None, typer.Option(
        help="The one format of the source's dates, in strptime codes (e.g. '%m/%d/%Y'); "
             "default ISO 8601. Recorded in the manifest for evaluate.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing bundle in OUT.")] = False,
    dp_epsilon: Annotated[float | None, typer.Option(
        "--dp-epsilon", help="Train with differential privacy (DP-SGD, Opacus) within this "
                             "total epsilon; statistics are DP-released from the same budget.")
    ] = None,
    dp_delta: Annotated[float | None, typer.Option(
        "--dp-delta", help="DP delta (default 1/n_train^1.1; must be below 1/n_train).")] = None,
    min_patients: Annotated[int | None, typer.Option(
        "--min-patients", help="Small-cell suppression k: codes carried by fewer training "
                               "patients are left out (default 11).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    export: Annotated[bool, typer.Option(help="Export ONNX graphs when available.")] = True,
) -> None:
    """Train the hierarchical BART on a corpus and write a bundle to OUT."""
    from training.cli_train import run_train

    if dp_epsilon is not None and not dp_epsilon > 0:  # 0 would silently mean "no DP"
        raise fail(f"--dp-epsilon must be a positive finite number, got {dp_epsilon!r}")
    if dp_delta is not None and dp_epsilon is None:
        raise fail("--dp-delta needs --dp-epsilon (differential privacy is off without it)")
    overrides = {}
    for key, value in (("train.dp_epsilon", dp_epsilon), ("train.dp_delta", dp_delta),
                       ("train.min_patients_per_code", min_patients)):
        if value is not None:
            overrides[key] = value
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--set wants key=value, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    try:
        run_train(out=out, source=source, data=data, preset=preset, size=size, config=config,
                  overrides=overrides, flat=flat, epochs=epochs, batch_size=batch_size,
                  seed=seed, threads=threads, max_minutes=max_minutes, device=device,
                  date_format=date_format,
                  resume=resume,
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
        ("schedule", _schedule_text(metrics.get("schedule"))),
        ("model choice", _choice_text(manifest.get("model_choice"))),
        ("val ppl/code", _fmt(metrics.get("val", {}).get("ppl_code"))),
        ("val fidelity", _fidelity_text((metrics.get("val") or {}).get("fidelity"))),
        ("stop calibration", _calibration_text(metrics.get("stop_calibration"))),
        ("test ppl/code", (f"{_fmt(test.get('ppl_code_from_demographics'))} from "
                           f"demographics, {_fmt(test.get('ppl_code_from_full_patient'))} from "
                           "the full patient")),
        ("training time", (f"{_fmt((metrics.get('wall_seconds') or 0) / 60)} min on "
                           f"{metrics.get('threads')} threads, peak RSS "
                           f"{_fmt(metrics.get('peak_rss_mb'), 0)} MiB")),
    ]
    rows += _privacy_rows(manifest.get("privacy") or {})
    rows += [(f"file {name}", sha[:16]) for name, sha in manifest.get("files", {}).items()]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _schedule_text(schedule: dict | None) -> str:
    if not schedule:
        return "-"
    budget = schedule.get("budget_minutes") or 0
    return (f"{schedule.get('planned_epochs')} of at most {schedule.get('max_epochs')} epochs "
            f"planned{f' for a {budget:g}-minute budget' if budget else ''}, "
            f"{schedule.get('total_steps')} steps, lr {schedule.get('lr')} -> "
            f"{_fmt(schedule.get('final_lr'), 6)}, "
            f"{'completed' if schedule.get('completed') else 'not completed'}")


def _choice_text(choice: dict | None) -> str:
    if not choice:
        return "-"
    reasons = choice.get("reasons") or {}
    return f"{choice.get('size')} ({reasons.get('size', '')})"


def _fidelity_text(fidelity: dict | None) -> str:
    if not fidelity:
        return "-"
    return (f"bigram R2 {_fmt(fidelity.get('bigram_r2'), 3)}, unigram R2 "
            f"{_fmt(fidelity.get('unigram_r2'), 3)}, KS visits/patient "
            f"{_fmt(fidelity.get('ks_visits_per_patient'), 3)} ({fidelity.get('n')} validation "
            "patients, before stop calibration)")


def _calibration_text(info: dict | None) -> str:
    if not info or not info.get("iterations"):
        return "-"
    steps = info["iterations"]
    best = steps[info.get("selected_iteration", len(steps) - 1)]
    return (f"KS visits/patient vs train {steps[0]['ks_visits_per_patient_vs_train']:.3f} -> "
            f"{best['ks_visits_per_patient_vs_train']:.3f}")


def _privacy_rows(privacy: dict) -> list[tuple[str, str]]:
    """``info`` rows of the manifest's ``privacy`` section (older bundles have none)."""
    small = privacy.get("small_cell_suppression")
    rows = [("small-cell suppression", "not recorded (bundle predates it)" if not small else
             f"k = {small.get('min_patients_per_code')}: codes carried by fewer training "
             f"patients left out; removed "
             f"{'not released (DP)' if small.get('codes_removed') is None else small['codes_removed']}"
             f", kept {small.get('codes_kept')}")]
    dp = privacy.get("differential_privacy")
    if not dp:
        return rows + [("differential privacy", "no")]
    split = dp.get("split") or {}
    rows += [
        ("differential privacy", (f"epsilon {_fmt(dp.get('epsilon'), 3)} (target "
                                  f"{_fmt(dp.get('epsilon_target'), 3)}), delta "
                                  f"{dp.get('delta', 0):.3g}, accountant {dp.get('accountant')}")),
        ("DP-SGD", (f"clipping norm {dp.get('max_grad_norm')}, noise multiplier "
                    f"{_fmt(dp.get('noise_multiplier'), 3)}, sample rate "
                    f"{dp.get('sample_rate', 0):.4g}, {dp.get('steps')} steps")),
        ("epsilon split", (f"DP-SGD alone {_fmt(split.get('dp_sgd_alone'), 3)}, statistics "
                           f"alone {_fmt(split.get('statistics_alone'), 3)}, composed "
                           f"{_fmt(split.get('composed_total'), 3)}")),
        ("not in this bundle", ", ".join(sorted(dp.get("unavailable_strategies") or {}))
         + " (strategies); co-occurrence matrix, retrieval index"),
    ]
    return rows


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


@app.command("calibrate")
def calibrate_cmd(
    bundle: Annotated[Path, typer.Option(help="Bundle folder to (re)calibrate.")],
    data: Annotated[Path | None, typer.Option(
        help="Data the bundle was trained on (default: the path in its manifest).")] = None,
    patients: Annotated[int, typer.Option(help="Validation demographics in the sample.")] = 8000,
    threads: Annotated[int, typer.Option(help="Torch threads.")] = 1,
) -> None:
    """Fit the bundle's stop calibration (visits per patient, codes per visit) on the
    validation split's demographics against the training split's histograms. Training does
    this by itself; use it for a bundle trained without it."""
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
    calibrate_bundle(bundle, split.val, split.train, patients=patients, seed=seed,
                     threads=threads, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"stop calibration written to {bundle}/calibration.json")


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

    from app.athena import AthenaError
    from app.service.api import create_app

    settings = _service_settings(bundle, redis_url)
    try:
        api = create_app(settings)
    except AthenaError as err:  # SYNTHEHR_ATHENA_VOCABULARY names a folder that cannot be used
        raise fail(str(err)) from None
    uvicorn.run(api, host=host, port=port, log_config=None,
                log_level=settings.log_level.lower(), access_log=False)


@app.command("generate")
def generate_command(
    out: Annotated[Path, typer.Option("--out", help="File to write.")],
    bundle: Annotated[Path | None, typer.Option(help="Bundle folder (default: SYNTHEHR_BUNDLE "
                                                     "or models/demo).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json, ndjson, csv, mimic3, omop, fhir "
                                                      "or parquet.")] = "csv",
    spec: Annotated[Path | None, typer.Option(
        help="A JSON file with the POST /v1/cohorts body; the options below are ignored.")
    ] = None,
    size: Annotated[int, typer.Option(help="Patients.")] = 100,
    age: Annotated[str, typer.Option(help="A fixed age (67) or a range (40-80).")] = "0-90",
    female_fraction: Annotated[float, typer.Option(help="Share of female patients.")] = 0.5,
    strategy: Annotated[str, typer.Option(help="Decoding strategy.")] = "plain",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    must_include: Annotated[str | None, typer.Option(help="Comma-separated codes every "
                                                          "patient carries.")] = None,
    any_of: Annotated[str | None, typer.Option(help="Comma-separated codes or categories; "
                                                    "each patient carries one at least.")] = None,
    exclude: Annotated[str | None, typer.Option(help="Comma-separated codes or categories "
                                                     "never generated.")] = None,
) -> None:
    """Write a cohort to a file in any result format, without the service (no Redis)."""
    import json

    from app.athena import AthenaError, load_athena
    from app.service.cohort_file import write_cohort
    from app.service.exports import FORMATS
    from app.service.generation import load_generator
    from app.service.jobs import possible_demographics

    if fmt not in FORMATS:
        raise fail(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    settings = _service_settings(bundle, None)
    try:
        if spec is not None:
            body = json.loads(spec.read_text())
        else:
            low, _, high = age.partition("-")

            def items(text: str | None) -> list[str]:
                return [c.strip() for c in (text or "").split(",") if c.strip()]

            body = {"size": size, "female_fraction": female_fraction, "strategy": strategy,
                    "seed": seed, "must_include": items(must_include), "any_of": items(any_of),
                    "exclude": items(exclude),
                    "age": {"min": float(low), "max": float(high)} if high else float(low)}
        cohort = _cohort_spec(body, settings)
    except (OSError, ValueError) as err:
        where = f"--spec {spec}" if spec is not None else "options"
        raise fail(f"{where}: {err}") from None
    try:
        concepts = (load_athena(settings.athena_vocabulary)
                    if settings.athena_vocabulary is not None else None)
        generator = load_generator(settings.bundle, settings.ort_threads)
    except AthenaError as err:
        raise fail(str(err)) from None
    except (ValueError, OSError, RuntimeError) as err:
        raise fail(f"cannot load bundle {settings.bundle}: {err}") from None
    unknown = [c for c in cohort.must_include if not generator.has_code(c)]
    if unknown:
        raise fail(f"must_include: code {unknown[0]} is not in the model's vocabulary")
    try:  # the service's submission check: an infeasible spec fails before any decoding
        ages, sexes = possible_demographics(cohort)
        generator.check_target(ages, sexes, cohort.must_include, cohort.any_of, cohort.exclude,
                               cohort.validity_mask)
    except ValueError as err:
        raise fail(str(err)) from None
    result = write_cohort(generator, cohort, fmt, out, chunk_size=settings.chunk_size,
                          batch=settings.generation_batch, concepts=concepts)
    console.print(f"wrote {result.patients:,} patients ({fmt}, {result.bytes:,} bytes) to "
                  f"{result.path}", highlight=False)


def _cohort_spec(body: dict, settings):
    """A validated cohort spec; ``ValueError`` naming the field and reason."""
    from pydantic import ValidationError

    from app.service.schemas import CohortSpec

    try:
        cohort = CohortSpec.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "spec"
        raise ValueError(f"{field}: {first['msg']}") from None
    if cohort.size > settings.max_cohort_size:
        raise ValueError(f"size: at most {settings.max_cohort_size} patients, got {cohort.size}")
    return cohort


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

    from app.service.models import load_configured
    from app.service.store import RedisStore
    from app.service.worker import Worker

    settings = _service_settings(bundle, redis_url)
    if not settings.redis_url:
        raise fail("the worker needs a Redis job store: set REDIS_URL (without one, "
                   "`synthehr serve` runs its own in-process worker)")
    try:
        generator = load_configured(settings)  # every bundle of SYNTHEHR_BUNDLES, or the one
    except (ValueError, OSError, RuntimeError) as err:
        raise fail(f"cannot load bundle {settings.bundles or settings.bundle}: {err}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Worker(RedisStore(settings.redis_url, settings.key_prefix), generator, settings).run(stop)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
