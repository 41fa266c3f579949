"""``synthehr data``: load, inspect and simulate patient corpora."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from app.cli import console, fail
from app.corpus import Corpus, corpus_stats, length_stats

__all__ = ["data_app", "data_simulate", "data_stats", "print_corpus_report"]

data_app = typer.Typer(help="Load, inspect and simulate patient corpora.", no_args_is_help=True)


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
    from training.cli.train import load_training_corpus
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

