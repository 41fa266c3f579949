"""The ``synthehr`` command.

The serving commands live here and need neither torch nor the training package. The other
commands come from plugins: each entry point of the ``synthehr.commands`` group names a
``register(app: typer.Typer)`` function that adds its commands (pyproject.toml names
``training.cli:register``: ``data``, ``train``, ``evaluate`` and ``calibrate``). Plugins are
loaded on first need only (a command that is not a serving one, or the command list), so the
runtime never imports ``training``, and a plugin that cannot be loaded (no torch in the serving
image, say) leaves the serving commands working and is reported when one of its commands is
asked for.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

#: The entry-point group of command plugins.
PLUGIN_GROUP = "synthehr.commands"

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


@dataclass(frozen=True)
class PluginFailure:
    """An entry point of :data:`PLUGIN_GROUP` that could not be loaded, and why."""

    name: str
    target: str
    error: str

    def describe(self) -> str:
        return f"the commands of plugin {self.name!r} ({self.target}) are unavailable: {self.error}"


@functools.cache
def load_plugins() -> tuple[dict[str, Any], tuple[PluginFailure, ...]]:
    """The commands of every plugin, by name (click commands; entry points in name order, the
    first to take a name keeps it), and the plugins that failed; loaded once per process."""
    commands: dict[str, Any] = {}
    failures: list[PluginFailure] = []
    for entry in sorted(importlib.metadata.entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        plugin = typer.Typer()
        try:
            entry.load()(plugin)
            group = typer.main.get_group(plugin)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not take `serve` down
            failures.append(PluginFailure(entry.name, entry.value, f"{type(err).__name__}: {err}"))
            continue
        for name, command in group.commands.items():
            commands.setdefault(name, command)
    return commands, tuple(failures)


class PluginGroup(TyperGroup):
    """The top-level group: the serving commands, and the plugins' once they are needed."""

    def _add_plugins(self) -> tuple[PluginFailure, ...]:
        commands, failures = load_plugins()
        for name, command in commands.items():
            self.commands.setdefault(name, command)  # a serving command keeps its name
        return failures

    def list_commands(self, ctx: Any) -> list[str]:
        self._add_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:  # a serving command: no plugin is imported
            return command
        failures = self._add_plugins()
        command = super().get_command(ctx, cmd_name)
        if command is None and failures and not ctx.resilient_parsing:
            ctx.fail(f"No such command {cmd_name!r}; "
                     + "; ".join(f.describe() for f in failures) + ".")
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        for failure in load_plugins()[1]:
            err_console.print(f"[yellow]note:[/] {failure.describe()}", highlight=False)


app = typer.Typer(cls=PluginGroup,
                  help="Synthetic EHR patients: data, training, evaluation and serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


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
    from app.runtime.generators import load_generator
    from app.service.cohort_file import write_cohort
    from app.service.exports import FORMATS
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

    from app.runtime.bundles import load_configured
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
