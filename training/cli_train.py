"""``synthehr train``: resolve the corpus and the run configuration, then call the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.corpus import Corpus
from training.config import SIZES, RunConfig, model_config_for
from training.sizing import corpus_profile, recipe_for
from training.splits import split_patients

__all__ = ["default_run_config", "load_training_corpus", "run_train"]

# Recipes of the project's own simulation presets. Every other corpus gets the recipe of
# training.sizing, chosen from its training split.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The demo preset is the first thing a new user meets (scripts/serve.sh builds it): a
    # tiny model on a 30-second budget, so the service answers within a minute of setup.
    "simulated:demo": {"train.max_minutes": 0.5, "train.epochs": 40,
                       "train.fidelity_patients": 600, "train.calibration_patients": 1000},
}


def default_run_config(corpus: Corpus, size: str = "auto") -> tuple[RunConfig, dict[str, Any]]:
    """The run config for ``corpus`` and how it was chosen (recorded in the manifest).

    ``size="auto"`` picks the size from the corpus (:func:`training.sizing.recipe_for`);
    a named size keeps the rest of the recipe.
    """
    profile = corpus_profile(split_patients(corpus.patients).train)
    auto_size, overrides, reasons = recipe_for(profile)
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
                         seed: int = 0, date_format: str | None = None):
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
        run, choice = default_run_config(corpus, size)
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
