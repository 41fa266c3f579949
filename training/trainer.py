"""The trainer: corpus -> split -> vocabulary/co-occurrence (train only) -> model -> bundle.

Per epoch it reports train loss, validation loss (training objective, fixed corruption seed)
and validation per-code perplexity with the encoder given only the demographics (the way the
service generates), early-stops on the validation NLL per token of that demographics-only
reconstruction (structure tokens, END included), and writes ``checkpoint.pt`` in the output
folder after every epoch so ``resume=True`` continues exactly where it stopped. Everything
random is derived from ``train.seed`` and the epoch number, so a resumed run equals an
uninterrupted one. The best epoch's weights go into the bundle; the test split is evaluated
once, at the end.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from app.bundle import read_manifest
from app.cooccurrence import build_cooccurrence
from app.corpus import Corpus, Patient
from app.decoding.calibration import CALIBRATION_FILE
from app.vocab import Vocabulary, code_rank
from app.windows import CONTEXT_VISITS, MANIFEST_KEY, RULE_TRUNCATE, RULE_WINDOWS, WindowRule
from training.bundle import add_bundle_file, corpus_hash, write_bundle, write_manifest
from training.calibrate import fit_calibration
from training.config import ObjectiveConfig, RunConfig, TrainConfig
from training.dataset import (
    EncodedPatient,
    collate,
    encode_patients,
    encode_windowed,
    length_batches,
)
from training.distributed import context as process_context
from training.fidelity import (
    sample_engine,
    validation_fidelity,
    validation_subsample,
)
from training.memory import TRIM_EVERY_STEPS, release_heap
from training.model import HierBart
from training.objective import code_frequencies, compute_loss, cooc_operator
from training.pretrain import pretrain_code_embeddings
from training.privacy.run import prepare_privacy
from training.schedule import BudgetSchedule, plan_epochs, warmup_for
from training.sizing import patient_length
from training.splits import split_patients

__all__ = ["TrainResult", "evaluate", "peak_rss_mb", "subsample", "train"]

CHECKPOINT = "checkpoint.pt"
EVAL_SEED = 20240917  # fixed code order / corruption for validation and test


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class TrainResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    history: list[dict[str, Any]]
    model: HierBart


@torch.no_grad()
def evaluate(model: HierBart, patients: list[EncodedPatient], objective: ObjectiveConfig,
             mode: str = "demographics", batch_size: int = 512, seed: int = EVAL_SEED,
             cooc: torch.Tensor | None = None, max_tokens: int = 0) -> dict[str, float]:
    """Mean NLL per token and per code, per-code perplexity, and the objective's loss.

    ``mode``: ``demographics`` (encoder sees only age/sex), ``train`` (the training corruption,
    seeded) or ``full`` (encoder sees the patient). Code order within visits is seeded.
    """
    was_training = model.training
    model.eval()
    release_heap()  # the training steps' freed memory, before this pass's (training.memory)
    rng = np.random.default_rng(seed)
    nll = code_nll = loss = 0.0
    n_tok = n_code = 0
    lengths = [p.n_tokens for p in patients]
    for idx in length_batches(lengths, batch_size, None, max_tokens=max_tokens):
        batch = collate([patients[i] for i in idx], rng, objective, mode=mode)
        out = compute_loss(model, batch, objective, cooc)
        nll += out.nll_sum
        code_nll += out.code_nll_sum
        n_tok += out.n_tokens
        n_code += out.n_codes
        loss += float(out.loss) * out.n_tokens
    release_heap()
    model.train(was_training)
    per_code = code_nll / max(n_code, 1)
    return {"loss": loss / max(n_tok, 1), "nll_per_token": nll / max(n_tok, 1),
            "nll_per_code": per_code, "ppl_code": math.exp(per_code),
            "nll_per_structure_token": (nll - code_nll) / max(n_tok - n_code, 1),
            "n_codes": n_code, "n_tokens": n_tok}


def subsample(patients: list[Patient], n: int, seed: int) -> list[Patient]:
    if n <= 0 or n >= len(patients):
        return patients
    keep = np.sort(np.random.default_rng(seed).choice(len(patients), size=n, replace=False))
    return [patients[i] for i in keep]


def _param_groups(model: HierBart, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim >= 2 and "embed" not in name:
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _judge(score: float, best: float, higher_is_better: bool,
           tc: TrainConfig) -> tuple[bool, bool]:
    """``(improved, selected)`` of an epoch's validation ``score`` against the ``best`` so far.

    Improved: better than the best by ``min_delta`` (resets patience). Selected: within
    ``select_tolerance`` of the best, so the latest of the epochs equal within noise is kept.
    """
    if not math.isfinite(best):
        return True, True
    if higher_is_better:
        return score > best + tc.min_delta, score >= best - tc.select_tolerance
    return (score < best - tc.min_delta * abs(best),
            score <= best + tc.select_tolerance * abs(best))


def _weight_average(model: HierBart, decay: float, private: bool,
                    log: Callable[[str], None]) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters (None when ``decay``
    is 0, or under DP-SGD, whose per-sample hooks the averaged copy would not carry)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
    if decay == 0.0:
        return None
    if private:
        log("train.ema_decay is ignored under DP-SGD: the bundle keeps the trained weights")
        return None
    # parameters only: the buffers are fixed masks and index maps (a -inf mask would average
    # to NaN)
    return AveragedModel(model, multi_avg_fn=_warm_ema(decay), use_buffers=False)


def _warm_ema(decay: float) -> Callable[..., None]:
    """The EMA update with the decay warmed up, ``min(decay, (1 + n) / (10 + n))`` after ``n``
    averaged steps: a plain EMA of 0.998 still gives the random initial weights a quarter of
    the average after 700 steps (it scored bigram R2 0.56 where the raw weights scored 0.86)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               num_averaged: torch.Tensor | int) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(averaged, current, weight)

    return update


def _log_default(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(corpus: Corpus, out_dir: str | Path, config: RunConfig, *,
          data_info: dict[str, Any] | None = None, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] = _log_default,
          export: bool = True, stop_after_epochs: int | None = None,
          model_choice: dict[str, Any] | None = None) -> TrainResult:
    """Train on ``corpus`` and write a bundle to ``out_dir`` (see the module docstring).

    ``stop_after_epochs`` interrupts after that many epochs of this call without writing the
    bundle (to test resuming). ``model_choice`` (how the model size was chosen) is recorded in
    the manifest.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    tc, oc = config.train, config.objective
    # several processes under torchrun (training.distributed): rank 0 logs, validates, decides
    # and writes; every rank starts once a previous call's checkpoint is complete
    ddp = process_context(tc.device)
    ddp.check(tc.dp_epsilon)
    log, progress = ddp.quiet(log, progress)
    ddp.barrier()
    torch.set_num_threads(max(1, tc.threads))
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT

    split = split_patients(corpus.patients)
    train_patients = subsample(split.train, tc.max_train_patients, tc.seed)
    if not train_patients or not split.val:
        raise ValueError(f"corpus {corpus.source!r} is too small: {split.sizes()} patients "
                         f"in train/val/test")
    # small-cell suppression; a DP run also checks its settings and releases its statistics
    privacy = prepare_privacy(config, train_patients, resume=resume)
    vocab = privacy.vocab
    log(privacy.describe(tc.min_patients_per_code))
    cooc = None if privacy.dp else build_cooccurrence(train_patients, vocab)
    cooc_t = cooc_operator(cooc) if oc.cooc_weight > 0 else None
    max_len = config.model.max_positions
    rank = code_rank(vocab, oc.code_order)
    (enc_train, enc_val, enc_test), long_patients = _encode_splits(
        (train_patients, split.val, split.test), vocab, max_len, rank, tc.long_patients,
        privacy.dp, log)
    window_rule = WindowRule.from_manifest({MANIFEST_KEY: long_patients})
    lengths = [p.n_tokens for p in enc_train]
    log(f"data: {corpus.source}, split {split.sizes()}, training on {len(train_patients)} "
        f"patients ({len(enc_train)} examples), vocabulary {vocab.n_codes} codes / "
        f"{vocab.n_categories} categories")

    torch.manual_seed(tc.seed)
    model = HierBart(config.model, vocab)
    device = ddp.device(_device(tc.device))
    model.to(device)
    cooc_t = cooc_t.to(device) if cooc_t is not None else None
    # the moment-matching target: the training split's code frequencies. Not under DP: the
    # exact counts are not released there (the DP vocabulary's counts are noisy)
    freq_t = code_frequencies(vocab.counts).to(device) \
        if oc.marginal_weight > 0 and not privacy.dp else None
    if oc.marginal_weight > 0 and privacy.dp:
        log("objective.marginal_weight is off under DP-SGD (it reads exact code frequencies)")
    if oc.contrastive_steps > 0 and cooc is not None and not resume:
        info = pretrain_code_embeddings(model, cooc, oc.contrastive_steps, seed=tc.seed)
        log(f"contrastive pretraining of the code embeddings: {info['steps']} steps, InfoNCE "
            f"{info.get('first_loss', 0):.3f} -> {info.get('last_loss', 0):.3f} (chance "
            f"{info.get('chance_loss', 0):.3f})")
    log(f"model: {'hierarchical' if config.model.hierarchical else 'flat'}, "
        f"{model.n_parameters():,} parameters, d={config.model.d_model}, "
        f"{config.model.encoder_layers}+{config.model.decoder_layers} layers, on {device}")
    optimizer = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr)
    steps_per_epoch = sum(1 for _ in length_batches(lengths, tc.batch_size, None,
                                                    max_tokens=tc.max_batch_tokens))
    private = privacy.attach(model, optimizer, oc, tc.seed)  # None unless DP
    # the judged weights: an exponential average of the trained ones (train.ema_decay), else
    # the trained ones themselves
    ema = _weight_average(model, tc.ema_decay, bool(private), log)
    judged = ema.module if ema is not None else model
    # a DP run's noise is set for train.epochs: it runs them all (no time-budget plan)
    budget_s = 0.0 if private else tc.max_minutes * 60.0
    schedule = BudgetSchedule(
        warmup_for(tc.warmup_steps, steps_per_epoch, steps_per_epoch * tc.epochs),
        steps_per_epoch * tc.epochs, tc.lr_min_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    planned_epochs = tc.epochs
    # the fidelity sample: fixed validation patients, limits as the bundle's engine will have
    fid_real = validation_subsample(split.val, tc.fidelity_patients, tc.seed + 17)
    limits = {"max_visits": max(len(p.visits) for p in train_patients),
              "max_codes": max(len(v) for p in train_patients for v in p.visits)}
    higher_is_better = tc.monitor == "fidelity"
    if tc.monitor not in ("fidelity", "nll_per_token", "nll_per_code"):
        raise ValueError(f"train.monitor: unknown {tc.monitor!r}; use fidelity, "
                         f"nll_per_token or nll_per_code")

    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_score, best_epoch, bad_epochs, start_epoch, elapsed_before = math.nan, -1, 0, 0, 0.0
    post_s = 0.0  # measured cost of the work that follows training (evaluations, sampling)
    stopped_by = "epochs"
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if _comparable(ckpt["run_config"]) != _comparable(config.to_dict()):
            raise ValueError(f"{ckpt_path}: checkpoint was written with a different config; "
                             f"resume with the same options or start a new output folder")
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        schedule.load_state_dict(ckpt["schedule"])
        planned_epochs = ckpt["planned_epochs"]
        history, best_state = ckpt["history"], ckpt["best_state"]
        best_score, best_epoch = ckpt["best_score"], ckpt["best_epoch"]
        bad_epochs, start_epoch = ckpt["bad_epochs"], ckpt["epoch"] + 1
        elapsed_before = ckpt.get("elapsed_s", 0.0)
        post_s = ckpt.get("post_s", 0.0)
        stopped_by = ckpt.get("stopped_by") or "epochs"
        log(f"resumed from {ckpt_path} after epoch {start_epoch}")
    elif resume:
        log(f"no checkpoint in {out_dir}; starting from scratch")

    def replan(epochs_done: float, epoch_s: float) -> None:
        nonlocal planned_epochs
        if budget_s <= 0:
            return
        elapsed = elapsed_before + time.perf_counter() - started
        # keep back what follows training (measured) and the export
        reserve = post_s + min(20.0, 0.1 * budget_s)  # + the export
        wanted = plan_epochs(max_epochs=tc.epochs, epochs_done=epochs_done, budget_s=budget_s,
                             elapsed_s=elapsed, epoch_s=epoch_s, reserve_s=reserve)
        wanted = max(wanted, math.ceil(epochs_done))
        wanted = ddp.share(wanted)  # rank 0's clock plans every rank
        if schedule.replan(wanted * steps_per_epoch, scheduler.last_epoch):
            planned_epochs = math.ceil(schedule.total_steps / steps_per_epoch)
            log(f"time budget {tc.max_minutes:g} min: schedule planned for {planned_epochs} "
                f"epoch(s) ({schedule.total_steps} steps, {epoch_s:.0f}s per epoch)")

    epochs_run = 0
    done = start_epoch >= planned_epochs or (bad_epochs >= tc.patience and tc.patience > 0)
    epoch = start_epoch
    probe_steps = min(max(30, steps_per_epoch // 10), steps_per_epoch)
    # one process: the loss of the batch; several: this rank's rows of it, through DDP
    step_loss = ddp.step_loss(model, lambda m, b: compute_loss(m, b, oc, cooc_t, freq_t))
    while not done:
        epoch_start = time.perf_counter()
        rng = np.random.default_rng([tc.seed, epoch])
        torch.manual_seed(ddp.seed(tc.seed * 100_003 + epoch))
        model.train()
        total, n_tok = 0.0, 0
        code_nll, n_code = 0.0, 0
        batches = private.batches(epoch) if private else \
            list(length_batches(lengths, tc.batch_size, rng, max_tokens=tc.max_batch_tokens))
        bar = _progress(batches, progress, f"epoch {epoch + 1}/{planned_epochs}")
        for n_batches, idx in enumerate(bar, start=1):
            batch = collate([enc_train[i] for i in idx], rng, oc, mode="train").to(device) \
                if len(idx) else None
            if private:  # DP-SGD: per-sample clipping and noise replace the plain step
                out = private.step(batch)
            else:
                out = step_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
            scheduler.step()
            if n_batches % TRIM_EVERY_STEPS == 0:  # freed activations back to the OS
                release_heap()
            total += float(out.loss.detach()) * out.n_tokens
            n_tok += out.n_tokens
            code_nll += out.code_nll_sum
            n_code += out.n_codes
            if hasattr(bar, "set_postfix") and n_batches % 20 == 0:
                bar.set_postfix(loss=f"{total / n_tok:.3f}")
            if epoch == 0 and n_batches == probe_steps and not history:
                # first plan: step time of the first steps, plus a guess for validation
                per_step = (time.perf_counter() - epoch_start) / probe_steps
                replan(n_batches / steps_per_epoch, 1.3 * per_step * steps_per_epoch)
        total, n_tok, code_nll, n_code = ddp.sum_all(total, n_tok, code_nll, n_code)
        if not ddp.is_main:  # rank 0 validates, plans, decides and checkpoints: follow it
            replan(epoch + 1, 0.0)
            done = ddp.share(None)
            epoch, epochs_run = epoch + 1, epochs_run + 1
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs and not done:
                return TrainResult(out_dir, {}, history, model)
            continue
        train_s = time.perf_counter() - epoch_start
        tick = time.perf_counter()
        val_obj = evaluate(judged, enc_val, oc, "train", tc.eval_batch_size, cooc=cooc_t,
                           max_tokens=tc.eval_max_batch_tokens)
        val_gen = evaluate(judged, enc_val, oc, "demographics", tc.eval_batch_size,
                           max_tokens=tc.eval_max_batch_tokens)
        eval_s = time.perf_counter() - tick
        fidelity = None
        if tc.monitor == "fidelity":
            engine = sample_engine(judged, vocab, **limits, windows=window_rule,
                                   code_order=oc.code_order)
            fidelity = validation_fidelity(
                engine, fid_real, seed=EVAL_SEED, min_generated=tc.fidelity_patients,
                train=train_patients if tc.calibrate and not private else None)
            model.train()
            score = fidelity["score"]
        else:
            score = val_gen[tc.monitor]
        # what follows training: the test evaluation (two passes) and the calibration's
        # samples (per temperature four to fit the stop offsets, and one to score them where
        # there is a temperature to choose, of up to calibration_patients demographics)
        n_cal = tc.calibration_patients or len(split.val)
        n_fid = max(tc.fidelity_patients, len(fid_real))
        temps = len(tc.calibration_temperatures)
        post_s = eval_s * len(enc_test) / max(len(enc_val), 1) + (
            (4 if temps == 1 else 5 * temps) * fidelity["sample_seconds"] * n_cal
            / max(n_fid, 1) if fidelity and tc.calibrate else 0.0)
        improved, selected = _judge(score, best_score, higher_is_better, tc)
        if selected:
            best_epoch = epoch
            best_state = {k: v.detach().clone() for k, v in judged.state_dict().items()}
        if improved:
            best_score, bad_epochs = score, 0
        elif schedule.progress(scheduler.last_epoch) >= tc.patience_from:
            bad_epochs += 1
        record = {"epoch": epoch + 1, "train_loss": total / max(n_tok, 1),
                  "train_ppl_code": math.exp(code_nll / max(n_code, 1)),
                  "val_loss": val_obj["loss"], "val_ppl_code_corrupted": val_obj["ppl_code"],
                  "val_nll_per_token": val_gen["nll_per_token"],
                  "val_ppl_code": val_gen["ppl_code"],
                  "val_nll_structure": val_gen["nll_per_structure_token"],
                  "val_fidelity": fidelity, "score": score,
                  "lr": scheduler.get_last_lr()[0], "train_seconds": train_s,
                  "seconds": time.perf_counter() - epoch_start, "best": improved,
                  "selected": selected}
        history.append(record)
        fid_text = (f" | val fidelity {score:.4f} (bigram R2 {fidelity['bigram_r2']:.3f}, "
                    f"unigram R2 {fidelity['unigram_r2']:.3f}, KS visits "
                    f"{fidelity['ks_visits_per_patient']:.3f})" if fidelity else "")
        log(f"epoch {epoch + 1}/{planned_epochs}: train loss {record['train_loss']:.4f} "
            f"(ppl/code {record['train_ppl_code']:.2f}) | val loss {record['val_loss']:.4f} | "
            f"val from demographics: nll/token {val_gen['nll_per_token']:.4f}, ppl/code "
            f"{record['val_ppl_code']:.2f}{fid_text}{' *' if selected else ''} | lr "
            f"{record['lr']:.2e} | {record['seconds']:.0f}s")
        epochs_run += 1
        replan(epoch + 1, float(np.mean([h["seconds"] for h in history[-3:]])))
        elapsed = elapsed_before + time.perf_counter() - started
        if private and private.exhausted:
            stopped_by, done = "privacy_budget", True
        elif epoch + 1 >= planned_epochs:
            stopped_by = "time_budget" if planned_epochs < tc.epochs else "epochs"
            done = True
        elif tc.patience > 0 and bad_epochs >= tc.patience:
            stopped_by, done = "early_stopping", True
        done = ddp.share(done)  # the other ranks stop with rank 0
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "scheduler": scheduler.state_dict(), "schedule": schedule.state_dict(),
                    "planned_epochs": planned_epochs, "history": history,
                    "best_state": best_state, "best_score": best_score,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "epoch": epoch,
                    "run_config": config.to_dict(), "elapsed_s": elapsed, "post_s": post_s,
                    "stopped_by": stopped_by if done else None}, ckpt_path)
        epoch += 1
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs and not done:
            log(f"interrupted after epoch {epoch} (checkpoint kept)")
            return TrainResult(out_dir, {}, history, model)

    if not ddp.is_main:  # the test evaluation, the calibration and the bundle are rank 0's
        return TrainResult(out_dir, {}, history, model)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    test_gen = evaluate(model, enc_test, oc, "demographics", tc.eval_batch_size,
                        max_tokens=tc.eval_max_batch_tokens)
    test_full = evaluate(model, enc_test, oc, "full", tc.eval_batch_size,
                         max_tokens=tc.eval_max_batch_tokens)
    calibration = None
    # the calibration's targets are training-split histograms: not released under a DP budget
    if tc.calibrate and not private:
        cal_real = validation_subsample(split.val, tc.calibration_patients, tc.seed + 29)
        engine = sample_engine(model, vocab, **limits, windows=window_rule,
                               code_order=oc.code_order)
        calibration = fit_calibration(engine, cal_real, tc.calibration_patients,
                                      train_patients, temperatures=tc.calibration_temperatures,
                                      seed=EVAL_SEED, log=log)
    model.cpu()
    wall = elapsed_before + time.perf_counter() - started
    best = history[best_epoch] if 0 <= best_epoch < len(history) else {}
    metrics = {
        "best_epoch": best_epoch + 1, "selected_epoch": best_epoch + 1,
        "epochs_run": len(history), "stopped_by": stopped_by,
        "schedule": {"planned_epochs": planned_epochs, "max_epochs": tc.epochs,
                     "steps_per_epoch": steps_per_epoch, **schedule.state_dict(),
                     "lr": tc.lr, "final_lr": history[-1]["lr"] if history else None,
                     "budget_minutes": tc.max_minutes,
                     "completed": bool(history) and len(history) >= planned_epochs},
        "monitor": tc.monitor,
        "history": history,
        "val": {"nll_per_token": best.get("val_nll_per_token"),
                "ppl_code": best.get("val_ppl_code"), "score": best.get("score"),
                "fidelity": best.get("val_fidelity")},
        "test": {"ppl_code_from_demographics": test_gen["ppl_code"],
                 "nll_per_token_from_demographics": test_gen["nll_per_token"],
                 "ppl_code_from_full_patient": test_full["ppl_code"],
                 "n_codes": test_gen["n_codes"]},
        "stop_calibration": calibration.info if calibration is not None else None,
        "wall_seconds": wall, "peak_rss_mb": peak_rss_mb(), "threads": tc.threads,
        "device": str(device), **ddp.manifest(),
    }
    data = {"source": corpus.source, "content_hash": corpus_hash(corpus.patients),
            "n_patients": len(corpus.patients), "dropped": dict(corpus.drops.counts),
            **(data_info or {})}
    sizes = split.sizes()
    sizes["train_used"] = len(train_patients)
    manifest = write_bundle(out_dir, model=model, vocab=vocab, cooccurrence=cooc,
                            train_patients=train_patients, run_config=config.to_dict(),
                            data=data, splits=sizes, metrics=metrics,
                            privacy=privacy.manifest(tc.min_patients_per_code),
                            reference=privacy.release.reference_stats if privacy.dp else None)
    if calibration is not None:
        calibration.save(out_dir / CALIBRATION_FILE)
        add_bundle_file(out_dir, CALIBRATION_FILE)
    manifest = read_manifest(out_dir)
    manifest[MANIFEST_KEY] = long_patients
    if model_choice is not None:
        manifest["model_choice"] = model_choice
    write_manifest(out_dir, manifest)
    manifest = read_manifest(out_dir)
    log(f"test per-code perplexity from demographics {test_gen['ppl_code']:.2f} "
        f"(full patient in the encoder: {test_full['ppl_code']:.2f}); selected epoch "
        f"{best_epoch + 1} of {len(history)} ({stopped_by}); bundle written to "
        f"{out_dir} in {wall / 60:.1f} min, peak RSS {metrics['peak_rss_mb']:.0f} MiB")
    if export:
        manifest = _maybe_export(model, out_dir, log) or manifest
    ckpt_path.unlink(missing_ok=True)
    return TrainResult(out_dir, manifest, history, model)


def _encode_splits(splits: tuple[list[Patient], ...], vocab: Vocabulary, max_len: int,
                   rank: np.ndarray | None, rule: str, dp: bool,
                   log: Callable[[str], None]) -> tuple[tuple[list[EncodedPatient], ...],
                                                        dict[str, Any]]:
    """The train, validation and test examples under the long-patient rule, and the
    manifest's record of it (``long_patients``: the rule, and per split what it did)."""
    if rule not in (RULE_WINDOWS, RULE_TRUNCATE):
        raise ValueError(f"train.long_patients: unknown {rule!r}; use {RULE_WINDOWS} or "
                         f"{RULE_TRUNCATE}")
    names = ("train", "val", "test")
    if rule == RULE_WINDOWS and not dp:
        encoded = [encode_windowed(s, vocab, max_len, rank) for s in splits]
        info: dict[str, Any] = {"rule": RULE_WINDOWS, "max_positions": max_len,
                                "context_visits": CONTEXT_VISITS,
                                "context_tokens": WindowRule(max_len).context_tokens,
                                "years_per_visit": encoded[0].years_per_visit}
        info.update({name: e.counts for name, e in zip(names, encoded, strict=True)})
        t = encoded[0].counts
        if t["patients_windowed"]:
            log(f"{t['patients_windowed']} training patient(s) "
                f"({t['patients_windowed'] / max(t['patients_total'], 1):.2%}) are longer than "
                f"model.max_positions={max_len} tokens: trained on {t['windows']} windows of "
                f"consecutive visits ({t['continuation_windows']} continuation windows), "
                f"{t['visits_kept']:,} of {t['visits_total']:,} visits kept"
                + (f", {t['codes_cut']} codes cut from visits longer than a window"
                   if t["codes_cut"] else "")
                + f"; age per visit in continuation prompts {info['years_per_visit']:.3f} years")
        return tuple(e.examples for e in encoded), info
    encoded = [encode_patients(s, vocab, max_len, rank) for s in splits]
    info = {"rule": RULE_TRUNCATE, "max_positions": max_len,
            "reason": "differential privacy (a patient is one example)" if dp
            else "train.long_patients"}
    counts = {name: {"patients_total": len(patients),
                     "patients_cut": sum(patient_length(p) > max_len for p in patients),
                     "visits_total": sum(len(p.visits) for p in patients),
                     "visits_kept": sum(len(e.visits) for e in enc)}
              for name, patients, enc in zip(names, splits, encoded, strict=True)}
    if not dp:  # exact counts of long training patients are not released under DP
        info.update(counts)
    cut = counts["train"]["patients_cut"]
    if cut:
        log(f"{cut} training patient(s) ({cut / len(splits[0]):.2%}) are longer than "
            f"model.max_positions={max_len} tokens and keep their earliest visits that fit "
            f"({info['reason']})")
    return tuple(encoded), info


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda, but torch sees no CUDA GPU; use cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"train.device: unknown {name!r}; use cpu or cuda")
    return torch.device(name)


def _comparable(run_config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run config that must match to resume (threads, budget may change)."""
    train_part = {k: v for k, v in run_config["train"].items()
                  if k not in ("threads", "max_minutes", "eval_batch_size")}
    return {**run_config, "train": train_part}


def _maybe_export(model: HierBart, out_dir: Path, log: Callable[[str], None]):
    """Call ``training.export.export_onnx(model, bundle_dir)`` when that module exists."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("training.export") is None:
        return None
    module = importlib.import_module("training.export")
    fn = getattr(module, "export_onnx", None)
    if fn is None:
        return None
    log("exporting ONNX graphs (training.export.export_onnx)")
    fn(model, out_dir)
    from app.bundle import read_manifest
    return read_manifest(out_dir)


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
