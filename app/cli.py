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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
