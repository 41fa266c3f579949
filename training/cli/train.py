"""``synthehr train``: resolve the corpus and the run configuration, then call the trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli import fail
from app.corpus import Corpus
from training.config import SIZES, RunConfig, model_config_for
from training.sizing import corpus_profile, recipe_for
from training.splits import split_patients

__all__ = ["default_run_config", "load_training_corpus", "run_train", "train_command"]
# the keyword arguments of run_train that are paths (they travel to torchrun's processes as text)
_PATH_ARGS = ("out", "data", "config")
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
    _check_out(out, force, resume)
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


def _check_out(out: Path, force: bool, resume: bool) -> None:
    if (out / "manifest.json").exists() and not (force or resume):
        raise FileExistsError(f"{out} already holds a bundle; pass --force to overwrite it")


def _run_train_from_json(**kwargs: Any):
    """:func:`run_train` in one of torchrun's processes (``synthehr train --nproc N``)."""
    for key in _PATH_ARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = Path(kwargs[key])
    return run_train(**kwargs)


def _train_distributed(nproc: int, kwargs: dict[str, Any]) -> None:
    """``synthehr train --nproc N``: the same command in ``nproc`` processes under torchrun
    (:func:`training.distributed.launch`); what cannot run there is refused here first."""
    overrides = kwargs.get("overrides") or {}
    if overrides.get("train.dp_epsilon"):
        raise ValueError("differential privacy (DP-SGD) runs in one process only; drop --nproc")
    _check_out(Path(kwargs["out"]), kwargs["force"], kwargs["resume"])
    device = str(kwargs.get("device") or overrides.get("train.device") or "cpu")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < nproc:
            raise ValueError(f"--nproc {nproc} on CUDA needs {nproc} GPUs; torch sees "
                             f"{torch.cuda.device_count()}")
    from training.distributed import LaunchError, launch

    payload = {k: str(v) if k in _PATH_ARGS and v is not None else v for k, v in kwargs.items()}
    try:
        launch(nproc, "training.cli.train:_run_train_from_json", payload,
               threads=kwargs.get("threads") or 1)
    except LaunchError as err:
        raise ValueError(str(err)) from None


def _torchrun_world() -> int:
    """The number of processes torchrun started this one among (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


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
    nproc: Annotated[int, typer.Option(
        "--nproc", help="Train data-parallel in N processes on this machine (PyTorch "
                        "DistributedDataParallel under torchrun: gloo on CPU, NCCL on CUDA, "
                        "one torch thread each unless --threads). Not with --dp-epsilon.")] = 1,
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
    kwargs: dict[str, Any] = {
        "out": out, "source": source, "data": data, "preset": preset, "size": size,
        "config": config, "overrides": overrides, "flat": flat, "epochs": epochs,
        "batch_size": batch_size, "seed": seed, "threads": threads, "max_minutes": max_minutes,
        "device": device, "date_format": date_format, "resume": resume, "force": force,
        "progress": progress, "export": export}
    world = _torchrun_world()
    if nproc < 1:
        raise fail(f"--nproc must be at least 1, got {nproc}")
    if world > 1 and nproc not in (1, world):
        raise fail(f"--nproc {nproc} under torchrun, which started {world} processes: leave "
                   f"--nproc out (torchrun's --nproc-per-node sets the number)")
    try:
        if world > 1:  # started by torchrun: this process is one rank of the run
            from training.distributed import session

            with session():
                run_train(**kwargs)
        elif nproc > 1:
            _train_distributed(nproc, kwargs)
        else:
            run_train(**kwargs)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        if world > 1 and os.environ.get("RANK", "0") != "0":
            raise typer.Exit(code=2) from None  # rank 0 says why
        raise fail(str(err)) from None

