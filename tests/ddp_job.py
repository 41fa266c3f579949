"""What tests/test_distributed.py runs in each of torchrun's processes (not a test module).

:func:`run` is the target of :func:`training.distributed.launch`: in one process group it
trains an uninterrupted run, an interrupted one and its resumption, and checks the gradient that
DistributedDataParallel gives a rank's rows against the whole batch's gradient, and trains
one run whose time budget is spent at once (rank 0's plan must stop every rank). Rank 0 writes
what it saw to ``ROOT/observed.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from training.config import RunConfig, model_config_for

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(**train) -> RunConfig:
    """The tiny run of tests/test_trainer.py (``tiny_run``) for the MIMIC-III demo, with a
    time budget far above what it takes (so the plan is made, shared, and always 2 epochs)."""
    cfg = RunConfig(model=model_config_for("tiny", max_positions=512))
    return cfg.override({"train.batch_size": 16, "train.epochs": 2, "train.warmup_steps": 5,
                         "train.max_minutes": 30,
                         "train.threads": 1, "objective.cooc_weight": 0.1,
                         "train.fidelity_patients": 500, "train.calibration_patients": 500,
                         **{f"train.{k}": v for k, v in train.items()}})


def _gradient_check(corpus, config: RunConfig) -> dict[str, float]:
    """Largest difference between the gradient of DDP over the ranks' rows and the gradient
    of the whole batch in one process, for a 5-patient batch (rows 3 + 2) and a 1-patient one
    (the second rank gets a row at weight 0). Dropout is off (eval mode) and the co-occurrence
    term too: the token-weighted NLL is exact, the regularisers are not."""
    from app.vocab import Vocabulary
    from training.dataset import collate, encode_patients
    from training.distributed import context
    from training.model import HierBart
    from training.objective import compute_loss

    ddp = context("cpu")
    patients = corpus.patients[:20]
    vocab = Vocabulary.from_patients(patients)
    enc = encode_patients(patients, vocab, 512)
    torch.manual_seed(0)
    model = HierBart(config.model, vocab).eval()
    step = ddp.step_loss(model, lambda m, b: compute_loss(m, b, config.objective))
    worst = {}
    for name, rows in (("five", [0, 3, 5, 8, 13]), ("one", [2])):
        batch = collate([enc[i] for i in rows], np.random.default_rng(1), config.objective)
        model.zero_grad(set_to_none=True)
        compute_loss(model, batch, config.objective).loss.backward()
        whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        step(batch).loss.backward()
        worst[name] = max(float((p.grad - whole[n]).abs().max())
                          for n, p in model.named_parameters() if n in whole)
        worst[f"{name}_missing"] = sum(p.grad is None for n, p in model.named_parameters()
                                       if n in whole)
    return worst


def run(root: str, config: dict) -> None:
    from training.loaders import load_corpus
    from training.trainer import train

    root_dir = Path(root)
    corpus = load_corpus("mimic3", DATA / "mimic3-demo")
    cfg = RunConfig.from_dict(config)
    quiet = {"progress": False, "log": lambda m: None, "export": False}
    observed: dict = {"gradient": _gradient_check(corpus, cfg)}
    whole = train(corpus, root_dir / "whole", cfg, **quiet)
    part = train(corpus, root_dir / "part", cfg, stop_after_epochs=1, **quiet)
    observed["part"] = {"history": len(part.history),
                        "checkpoint": (root_dir / "part" / "checkpoint.pt").is_file(),
                        "manifest": (root_dir / "part" / "manifest.json").exists()}
    resumed = train(corpus, root_dir / "part", cfg, resume=True, **quiet)
    observed["whole_history"] = [h["train_loss"] for h in whole.history]
    observed["resumed_history"] = [h["train_loss"] for h in resumed.history]
    # a budget spent before the first plan: the plan shrinks to what is done (1 epoch, or 2
    # where the first plan comes after the last step of epoch 1), whatever the other clocks
    short = cfg.override({"train.max_minutes": 0.001, "train.epochs": 3})
    budget = train(corpus, root_dir / "budget", short, **quiet)
    metrics = budget.manifest.get("metrics", {})
    observed["budget"] = {"epochs": len(budget.history), "stopped_by": metrics.get("stopped_by"),
                          "planned": metrics.get("schedule", {}).get("planned_epochs")}
    if int(os.environ.get("RANK", "0")) == 0:
        (root_dir / "observed.json").write_text(json.dumps(observed))
