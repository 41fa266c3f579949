"""``synthehr train``: resolve the corpus and the run configuration, then call the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import SIZES, RunConfig, model_config_for

__all__ = ["default_run_config", "load_training_corpus", "run_train"]

# Defaults that depend on the corpus (the rest comes from the dataclass defaults).
CORPUS_DEFAULTS: dict[str, dict[str, Any]] = {
    # UCI: ~57k short patients (<= 3 codes per visit).
    "uci": {"train.batch_size": 256, "train.epochs": 30, "train.patience": 2,
            "train.max_minutes": 45,
            "model.ffn_dim": 256, "model.max_positions": 64},
    # The demo preset: 2,000 patients; must build in under 3 minutes on 2 cores.
    "simulated:demo": {"train.epochs": 8, "train.batch_size": 64, "train.patience": 2,
                       "train.warmup_steps": 50, "model.ffn_dim": 256},
    "simulated:mimic3-scale": {"train.batch_size": 64, "model.max_positions": 512},
    "mimic3": {"train.batch_size": 16, "train.epochs": 20, "train.warmup_steps": 20,
               "model.max_positions": 512},
    "eicu": {"train.batch_size": 64, "train.warmup_steps": 50, "model.max_positions": 512},
}


def default_run_config(corpus_source: str, size: str = "small") -> RunConfig:
    config = RunConfig(model=model_config_for(size))
    return config.override(CORPUS_DEFAULTS.get(corpus_source, {}))


def load_training_corpus(source: str | None, data: Path | None, preset: str | None,
                         seed: int = 0):
    if preset is not None:
        if source is not None or data is not None:
            raise ValueError("give either --preset or --source/--data, not both")
        from training.simulate import simulate_corpus

        return simulate_corpus(preset, seed).corpus
    if source is None or data is None:
        raise ValueError("give --source and --data (or --preset demo)")
    from training.loaders import load_corpus

    return load_corpus(source, data)


def run_train(*, out: Path, source: str | None, data: Path | None, preset: str | None,
              size: str = "small", config: Path | None = None,
              overrides: dict[str, Any] | None = None, flat: bool = False,
              epochs: int | None = None, batch_size: int | None = None, seed: int | None = None,
              threads: int | None = None, max_minutes: float | None = None,
              resume: bool = False, force: bool = False, progress: bool = True,
              export: bool = True):
    from training.trainer import train

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out)
    if (out / "manifest.json").exists() and not (force or resume):
        raise FileExistsError(f"{out} already holds a bundle; pass --force to overwrite it")
    corpus = load_training_corpus(source, data, preset, seed or 0)
    run = RunConfig.load(config) if config else default_run_config(corpus.source, size)
    cli: dict[str, Any] = dict(overrides or {})
    for key, value in (("train.epochs", epochs), ("train.batch_size", batch_size),
                       ("train.seed", seed), ("train.threads", threads),
                       ("train.max_minutes", max_minutes)):
        if value is not None:
            cli[key] = value
    if flat:
        cli["model.hierarchical"] = False
    run = run.override(cli)
    info = {"path": str(data) if data else None, "preset": preset}
    return train(corpus, out, run, data_info=info, resume=resume, progress=progress,
                 export=export)
