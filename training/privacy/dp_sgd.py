"""DP-SGD training with Opacus: settings checks, budget calibration, the private step.

* **Mechanism.** Opacus' :class:`~opacus.optimizers.DPOptimizer` clips every patient's
  gradient to ``dp_max_grad_norm`` (L2) and adds Gaussian noise of standard deviation
  ``noise_multiplier * dp_max_grad_norm`` to their sum; batches are **Poisson samples** (each
  training patient joins each step independently with probability ``batch_size / n_train``,
  Opacus' :class:`~opacus.utils.uniform_sampler.UniformWithReplacementSampler`).
* **Per-sample gradients** come from ``torch.func`` (``vmap`` of ``grad`` over a
  ``functional_call`` of the whole loss), Opacus' functorch approach applied to the whole
  model. Opacus' hook-based ``GradSampleModule`` cannot take :class:`HierBart`: it refuses it
  ("Model contains a trainable layer with buffers that Opacus doesn't currently support":
  the model holds its output biases and hierarchy buffers itself), and its per-layer hooks
  would miss the output head's reuse of the embedding tables as output weights outside any
  module's ``forward``. A dry run on two patients checks the per-sample gradients against
  one-patient backward passes before training; Opacus' ``ModuleValidator`` names layers it
  cannot train privately (e.g. BatchNorm).
* **Accounting.** Opacus' RDP accountant. It holds the DP-SGD steps and the Gaussian releases of
  the statistics (:mod:`training.privacy.release`, sample rate 1), so the epsilon it reports
  is the bundle's total. ``dp_stats_fraction`` of the budget calibrates the statistics' noise;
  the SGD noise multiplier is then the smallest one (bisection) for which the whole
  composition stays within ``dp_epsilon`` at ``dp_delta`` after the planned steps. Training
  stops when those steps are spent (or earlier, by early stopping or the time budget).

Bad settings raise :class:`DPSettingsError` before any training (see :func:`plan_dp`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import ObjectiveConfig, TrainConfig

__all__ = ["ACCOUNTANT", "DPPlan", "DPSettingsError", "PrivateSGD", "check_model",
           "composed_epsilon", "plan_dp"]

ACCOUNTANT = "rdp"  # Opacus RDPAccountant
# RDP orders searched: Opacus' defaults (up to 63) and larger ones, which small epsilons need
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + \
    list(range(64, 256, 16)) + [256, 512]


class DPSettingsError(ValueError):
    """DP settings that cannot be honoured; raised before training starts."""


@dataclass
class DPPlan:
    """The calibrated DP-SGD run and its budget split."""

    epsilon: float  # the total budget asked for
    delta: float
    n_train: int
    batch_size: int  # expected Poisson batch
    sample_rate: float
    epochs: int
    steps: int
    max_grad_norm: float
    noise_multiplier: float  # DP-SGD
    stats_noise_multiplier: float  # each statistics release
    stats_releases: int
    epsilon_sgd_alone: float
    epsilon_stats_alone: float
    epsilon_planned: float  # the composition, <= epsilon

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accountant(history: list[tuple[float, float, int]]):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return acc


def composed_epsilon(delta: float, *, sgd: tuple[float, float, int] | None = None,
                     stats: tuple[float, int] | None = None) -> float:
    """Epsilon at ``delta`` of DP-SGD ``(noise, sample_rate, steps)`` composed with ``stats``
    Gaussian releases ``(noise, count)``, by Opacus' RDP accountant."""
    history = []
    if stats is not None and stats[1] > 0:
        history.append((stats[0], 1.0, stats[1]))
    if sgd is not None and sgd[2] > 0:
        history.append(sgd)
    if not history:
        return 0.0
    with warnings.catch_warnings():  # the calibration probes orders at the range's ends
        warnings.simplefilter("ignore", UserWarning)
        return float(_accountant(history).get_epsilon(delta, alphas=ALPHAS))


def plan_dp(tc: TrainConfig, objective: ObjectiveConfig, n_train: int, *,
            stats_releases: int, resume: bool = False) -> DPPlan:
    """Check the DP settings of a run and calibrate its noise; :class:`DPSettingsError` says
    what is wrong and, for an unreachable budget, what would reach it."""
    from opacus.accountants.utils import get_noise_multiplier

    eps, delta = float(tc.dp_epsilon), float(tc.dp_delta)
    if not math.isfinite(eps) or eps <= 0:
        raise DPSettingsError(f"--dp-epsilon must be a positive finite number, got {eps!r}")
    if n_train < 2:
        raise DPSettingsError(f"DP training needs at least 2 training patients, got {n_train}")
    if delta == 0.0:
        delta = 1.0 / n_train ** 1.1
    if not math.isfinite(delta) or not 0.0 < delta < 1.0 / n_train:
        raise DPSettingsError(f"--dp-delta must lie in (0, 1/{n_train:,}) = (0, "
                              f"{1.0 / n_train:.3g}) for {n_train:,} training patients "
                              f"(a larger delta lets a mechanism publish a whole record); "
                              f"got {delta!r}")
    if not 0.0 < tc.dp_stats_fraction < 1.0:
        raise DPSettingsError(f"train.dp_stats_fraction must lie in (0, 1), got "
                              f"{tc.dp_stats_fraction!r}")
    if tc.dp_max_grad_norm <= 0 or not math.isfinite(tc.dp_max_grad_norm):
        raise DPSettingsError(f"train.dp_max_grad_norm must be positive, got "
                              f"{tc.dp_max_grad_norm!r}")
    if tc.dp_max_codes_per_patient < 1:
        raise DPSettingsError("train.dp_max_codes_per_patient must be at least 1")
    if resume:
        raise DPSettingsError("--resume is not supported with DP training: the accountant's "
                              "state is not checkpointed; start a new output folder")
    if objective.contrastive_steps > 0:
        raise DPSettingsError("objective.contrastive_steps uses the exact co-occurrence matrix "
                              "of the training split, which a DP run does not release: set it "
                              "to 0")
    if objective.cooc_weight > 0:
        raise DPSettingsError("objective.cooc_weight > 0 uses the exact co-occurrence matrix of "
                              "the training split, which DP training cannot use; set it to 0")
    if objective.age_weight > 0 or objective.sex_weight > 0:
        raise DPSettingsError("objective.age_weight / sex_weight (auxiliary heads) are not "
                              "supported with DP training; set them to 0")
    batch = int(tc.batch_size)
    if not 1 <= batch < n_train:
        raise DPSettingsError(f"batch size {batch} must lie in [1, {n_train - 1}] for "
                              f"{n_train:,} training patients (Poisson sampling)")
    q = batch / n_train
    steps_per_epoch = math.ceil(n_train / batch)
    steps = int(tc.epochs) * steps_per_epoch
    if steps < 1:
        raise DPSettingsError("DP training needs at least one epoch")

    eps_stats_target = eps * tc.dp_stats_fraction
    try:
        with warnings.catch_warnings():  # orders at the range's end: see ALPHAS
            warnings.simplefilter("ignore", UserWarning)
            z_stats = get_noise_multiplier(target_epsilon=eps_stats_target,
                                           target_delta=delta / 2, sample_rate=1.0,
                                           steps=stats_releases, accountant=ACCOUNTANT,
                                           epsilon_tolerance=0.005, alphas=ALPHAS)
    except ValueError as err:
        raise DPSettingsError(f"--dp-epsilon {eps:g} cannot be reached: its statistics "
                              f"share ({eps_stats_target:.3g}, train.dp_stats_fraction) is out "
                              f"of the accountant's range ({err}). What would reach it: a "
                              f"larger --dp-epsilon or train.dp_stats_fraction") from None

    z_cap = float(tc.dp_max_noise_multiplier)

    def total(z: float, n_steps: int = steps, rate: float = q) -> float:
        return composed_epsilon(delta, sgd=(z, rate, n_steps), stats=(z_stats, stats_releases))

    if total(z_cap) > eps:
        raise DPSettingsError(_unreachable(eps, delta, n_train, batch, int(tc.epochs), z_cap,
                                           total, steps_per_epoch))
    lo, hi = 0.3, z_cap
    if total(lo) <= eps:
        hi = lo
    else:
        for _ in range(40):  # bisection on the noise multiplier
            mid = 0.5 * (lo + hi)
            if total(mid) <= eps:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-3:
                break
    z = hi
    return DPPlan(epsilon=eps, delta=delta, n_train=n_train, batch_size=batch, sample_rate=q,
                  epochs=int(tc.epochs), steps=steps, max_grad_norm=float(tc.dp_max_grad_norm),
                  noise_multiplier=z, stats_noise_multiplier=z_stats,
                  stats_releases=stats_releases,
                  epsilon_sgd_alone=composed_epsilon(delta, sgd=(z, q, steps)),
                  epsilon_stats_alone=composed_epsilon(delta, stats=(z_stats, stats_releases)),
                  epsilon_planned=total(z))


def _unreachable(eps: float, delta: float, n: int, batch: int, epochs: int, z_cap: float,
                 total, steps_per_epoch: int) -> str:
    """The error for a budget the accountant cannot reach, with settings that would."""
    floor = total(z_cap)
    fewer, lo, hi = None, 1, epochs - 1  # epsilon grows with epochs: bisect the most
    while lo <= hi:
        mid = (lo + hi) // 2
        if total(z_cap, mid * steps_per_epoch) <= eps:
            fewer, lo = mid, mid + 1
        else:
            hi = mid - 1
    larger = next((b for b in (batch * 2, batch * 4, batch * 8, batch * 16)
                   if b < n and total(z_cap, epochs * math.ceil(n / b), b / n) <= eps), None)
    ways = [f"--dp-epsilon {math.ceil(floor * 100) / 100:g} or more"]
    if fewer:
        ways.append(f"--epochs {fewer}")
    if larger:
        ways.append(f"--batch-size {larger}")
    return (f"--dp-epsilon {eps:g} cannot be reached with {epochs} epochs of batch {batch} "
            f"over {n:,} training patients (delta {delta:.3g}): even noise multiplier "
            f"{z_cap:g} (train.dp_max_noise_multiplier) spends epsilon {floor:.3g}. "
            f"What would reach it: {' or '.join(ways)}")


def check_model(model: nn.Module) -> None:
    """Refuse a model Opacus cannot train privately, naming the layer."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise DPSettingsError("the model has layers DP-SGD cannot handle: " + "; ".join(
            str(e) for e in errors))


class _PerSampleLoss(nn.Module):
    """Per-patient mean NLL of the target tokens (the objective's NLL, one row at a time)."""

    def __init__(self, model: nn.Module, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, input_ids, attention_mask, decoder_input_ids, labels, age, sex):
        from training.dataset import TOKENS

        h = self.model(input_ids, attention_mask, decoder_input_ids, age, sex)
        log_probs = self.model.output_log_probs(h)  # [B, T, V]
        nll = -log_probs.gather(-1, labels[..., None]).squeeze(-1)
        valid = (labels != TOKENS.pad).to(nll.dtype)
        n = valid.sum(-1).clamp_min(1.0)
        loss = (nll * valid).sum(-1) / n
        if self.label_smoothing > 0:
            finite = (log_probs > -1e8).to(nll.dtype)
            smooth = -(log_probs * finite).sum(-1) / finite.sum(-1).clamp_min(1.0)
            loss = (1 - self.label_smoothing) * loss \
                + self.label_smoothing * (smooth * valid).sum(-1) / n
        is_code = (labels >= TOKENS.n_special).to(nll.dtype) * valid
        return loss, (nll * valid).sum(-1), (nll * is_code).sum(-1), valid.sum(-1), \
            is_code.sum(-1)


class PrivateSGD:
    """Opacus' DPOptimizer around the run's optimizer, Poisson batches and the accountant."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, plan: DPPlan,
                 objective: ObjectiveConfig, seed: int, chunk_size: int = 32) -> None:
        from opacus.optimizers import DPOptimizer

        check_model(model)
        self.model, self.plan, self.seed = model, plan, seed
        self.loss_module = _PerSampleLoss(model, objective.label_smoothing)
        self.chunk_size = chunk_size
        self.names = [n for n, p in self.loss_module.named_parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(seed * 7_919 + 17)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=plan.max_grad_norm,
                                     expected_batch_size=plan.batch_size,
                                     loss_reduction="mean", generator=generator)
        self.accountant = _accountant([(plan.stats_noise_multiplier, 1.0,
                                        plan.stats_releases)])
        self.steps_done = 0
        self._dry_run()

    # -- batches ------------------------------------------------------------------------------
    def batches(self, epoch: int) -> list[np.ndarray]:
        """One epoch of Poisson batches (``ceil(n / batch)`` steps, sizes vary, may be empty)."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sampler = UniformWithReplacementSampler(num_samples=self.plan.n_train,
                                                sample_rate=self.plan.sample_rate, generator=g,
                                                steps=math.ceil(1 / self.plan.sample_rate))
        return [np.asarray(idx, dtype=np.int64) for idx in sampler]

    @property
    def exhausted(self) -> bool:
        """The planned steps (the whole budget) are spent."""
        return self.steps_done >= self.plan.steps

    def epsilon(self) -> float:
        """Epsilon spent so far: statistics releases + DP-SGD steps taken."""
        return float(self.accountant.get_epsilon(self.plan.delta, alphas=ALPHAS))

    # -- per-sample gradients -----------------------------------------------------------------
    def _per_sample(self, batch) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        from torch.func import functional_call, grad, vmap
        from torch.nn.attention import SDPBackend, sdpa_kernel

        module = self.loss_module
        params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
        buffers = dict(module.named_buffers())

        def one(p, ii, am, di, lab, age, sex):
            out = functional_call(module, (p, buffers),
                                  (ii[None], am[None], di[None], lab[None], age[None],
                                   sex[None]))
            return out[0][0], tuple(o[0] for o in out[1:])

        # the math attention kernel is plain batched matmuls (vmap has rules for them)
        with sdpa_kernel(SDPBackend.MATH):
            grads, aux = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0, 0, 0, 0, 0),
                              randomness="different", chunk_size=self.chunk_size)(
                params, batch.input_ids, batch.attention_mask, batch.decoder_input_ids,
                batch.labels, batch.age, batch.sex)
        return grads, aux

    def _dry_run(self) -> None:
        """Per-sample gradients of two synthetic patients must equal one-patient backward
        passes; a layer that breaks them is named in the error."""
        from training.dataset import TOKENS, Batch

        cfg = self.model.config
        first = cfg.n_special
        ids = torch.tensor([[TOKENS.bos, TOKENS.visit, first, TOKENS.end_visit, TOKENS.eos],
                            [TOKENS.bos, TOKENS.visit, first + cfg.n_codes - 1,
                             TOKENS.end_visit, TOKENS.eos]])
        batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids),
                      decoder_input_ids=ids[:, :-1], labels=ids[:, 1:],
                      age=torch.tensor([30.0, 70.0]), sex=torch.tensor([0, 1]))
        was_training = self.model.training
        self.model.eval()
        try:
            grads, _ = self._per_sample(batch)
            self.loss_module.zero_grad(set_to_none=True)
            out = self.loss_module(ids[1:], batch.attention_mask[1:], ids[1:, :-1],
                                   ids[1:, 1:], batch.age[1:], batch.sex[1:])
            out[0].sum().backward()
        except Exception as err:  # any failure means no per-sample gradients
            raise DPSettingsError(f"per-sample gradients (torch.func) fail on this model: "
                                  f"{type(err).__name__}: {err}") from err
        finally:
            self.model.train(was_training)
        for name, param in self.loss_module.named_parameters():
            if not param.requires_grad:
                continue
            ref = param.grad if param.grad is not None else torch.zeros_like(param)
            if not torch.allclose(grads[name][1], ref, atol=1e-5, rtol=1e-3):
                raise DPSettingsError(f"per-sample gradients of layer {name!r} differ from a "
                                      f"one-patient backward pass; DP-SGD cannot train it")
        self.loss_module.zero_grad(set_to_none=True)

    # -- the private step ---------------------------------------------------------------------
    def step(self, batch):
        """One DP-SGD step on a Poisson batch (``None`` or empty: a noise-only step, which the
        accountant charges like any other); returns the batch's LossOutput."""
        from training.objective import LossOutput

        params = [p for p in self.loss_module.parameters() if p.requires_grad]
        if batch is None or len(batch) == 0:
            for p in params:  # no patient: a zero gradient, so the update is noise only
                p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype)
            loss = LossOutput(torch.zeros(()), 0.0, 0, 0.0, 0)
        else:
            grads, (nll, code_nll, n_tok, n_code) = self._per_sample(batch)
            for name, p in zip(self.names, params, strict=True):
                p.grad_sample = grads[name]
            loss = LossOutput(loss=torch.tensor(float((nll / n_tok.clamp_min(1)).mean())),
                              nll_sum=float(nll.sum()), n_tokens=int(n_tok.sum()),
                              code_nll_sum=float(code_nll.sum()), n_codes=int(n_code.sum()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.accountant.step(noise_multiplier=self.plan.noise_multiplier,
                             sample_rate=self.plan.sample_rate)
        self.steps_done += 1
        return loss

    def manifest(self, stats_info: dict[str, Any]) -> dict[str, Any]:
        """The ``privacy.dp`` section of the manifest."""
        spent = self.epsilon()
        return {
            "epsilon": spent, "epsilon_target": self.plan.epsilon, "delta": self.plan.delta,
            "accountant": "RDP (Opacus RDPAccountant)", "mechanism": "DP-SGD (Opacus "
            "DPOptimizer: per-sample clipping, Gaussian noise), Poisson sampling",
            "max_grad_norm": self.plan.max_grad_norm,
            "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate, "expected_batch_size": self.plan.batch_size,
            "steps": self.steps_done, "steps_planned": self.plan.steps,
            "split": {"dp_sgd_alone": composed_epsilon(
                          self.plan.delta, sgd=(self.plan.noise_multiplier,
                                                self.plan.sample_rate, self.steps_done)),
                      "statistics_alone": self.plan.epsilon_stats_alone,
                      "composed_total": spent,
                      "note": "RDP composition of both is tighter than their sum"},
            "statistics": stats_info,
            "unit": "patient (add/remove one training patient)",
        }
