"""``synthehr train``: resolve the corpus and the run configuration, then call the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli import fail
from app.corpus import Corpus
from training.config import SIZES, RunConfig, model_config_for
from training.sizing import corpus_profile, recipe_for
from training.splits import split_patients

__all__ = ["default_run_config", "load_training_corpus", "run_train", "train_command"]
# Recipes of the project's own simulation presets. Every other corpus gets the recipe of
# training.sizing, chosen from its training split.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The demo preset is the first thing a new user meets (scripts/serve.sh builds it): a
    # tiny model on a 30-second budget, so the service answers within a minute of setup.
    "simulated:demo": {"train.max_minutes": 0.5, "train.epochs": 40,
                       "train.fidelity_patients": 600, "train.calibration_patients": 1000},
}


def default_run_config(corpus: Corpus, size: str = "auto", dp: bool = False
                       ) -> tuple[RunConfig, dict[str, Any]]:
    """The run config for ``corpus`` and how it was chosen (recorded in the manifest).

    ``size="auto"`` picks the size from the corpus (:func:`training.sizing.recipe_for`);
    a named size keeps the rest of the recipe. ``dp``: a differentially private run's recipe.
    """
    profile = corpus_profile(split_patients(corpus.patients).train)
    auto_size, overrides, reasons = recipe_for(profile, dp=dp)
    chosen = auto_size if size == "auto" else size
    if chosen not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose auto or one of {', '.join(SIZES)}")
    if size != "auto":
        reasons["size"] = "--size"
        if chosen != auto_size:
            overrides.pop("model.ffn_dim", None)
            reasons.pop("model.ffn_dim", None)
    overrides.update(PRESET_DEFAULTS.get(corpus.source, {}))
    for key in PRESET_DEFAULTS.get(corpus.source, {}):
        reasons[key] = f"the {corpus.source} preset's recipe"
    config = RunConfig(model=model_config_for(chosen)).override(overrides)
    choice = {"size": chosen, "auto_size": auto_size, "profile": profile.to_dict(),
              "overrides": overrides, "reasons": reasons}
    return config, choice


def load_training_corpus(source: str | None, data: Path | None, preset: str | None,
                         seed: int = 0, date_format: str | None = None) -> Corpus:
    """The corpus of ``synthehr train`` and ``synthehr data stats --preset``: a simulation
    preset, or ``source`` read from ``data``; ``ValueError`` when both or neither are given."""
    if preset is not None:
        if source is not None or data is not None:
            raise ValueError("give either --preset or --source/--data, not both")
        from training.simulate import simulate_corpus

        return simulate_corpus(preset, seed).corpus
    if source is None or data is None:
        raise ValueError("give --source and --data (or --preset demo)")
    from training.loaders import load_corpus

    return load_corpus(source, data, date_format=date_format)


def run_train(*, out: Path, source: str | None, data: Path | None, preset: str | None,
              size: str = "auto", config: Path | None = None,
              overrides: dict[str, Any] | None = None, flat: bool = False,
              epochs: int | None = None, batch_size: int | None = None, seed: int | None = None,
              threads: int | None = None, max_minutes: float | None = None,
              device: str | None = None, date_format: str | None = None,
              resume: bool = False, force: bool = False, progress: bool = True,
              export: bool = True):
    """Train a bundle into ``out`` (the body of ``synthehr train``): the given values override
    the ``config`` file or, without one, the recipe chosen from the corpus."""
    from training.trainer import train

    if size != "auto" and size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose auto or one of {', '.join(SIZES)}")
    out = Path(out)
    if (out / "manifest.json").exists() and not (force or resume):
        raise FileExistsError(f"{out} already holds a bundle; pass --force to overwrite it")
    corpus = load_training_corpus(source, data, preset, seed or 0, date_format)
    if config:
        run, choice = RunConfig.load(config), {"size": "config file", "path": str(config)}
    else:
        dp = bool((overrides or {}).get("train.dp_epsilon"))
        run, choice = default_run_config(corpus, size, dp=dp)
    cli: dict[str, Any] = dict(overrides or {})
    for key, value in (("train.epochs", epochs), ("train.batch_size", batch_size),
                       ("train.seed", seed), ("train.threads", threads),
                       ("train.max_minutes", max_minutes), ("train.device", device)):
        if value is not None:
            cli[key] = value
    if flat:
        cli["model.hierarchical"] = False
    run = run.override(cli)
    info = {"path": str(data) if data else None, "preset": preset, "date_format": date_format}
    return train(corpus, out, run, data_info=info, resume=resume, progress=progress,
                 export=export, model_choice=choice)


def _parse_value(text: str) -> Any:
    """A ``--set`` value: JSON where it parses (numbers, booleans, lists), else the string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


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

