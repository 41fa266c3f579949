"""The training objective: corrupted encoder view -> reconstruct the whole patient.

Corruption of the encoder input lives in :func:`training.dataset.corrupt` (span masking,
dropped codes, truncated later visits, and with some probability nothing but the
demographics, so generation from demographics alone is in distribution). The decoder is
teacher-forced on the full patient. The loss is

``NLL (hierarchical or flat, per target token)``
``+ cooc_weight * mean(-log(1 - m))`` where ``m`` is the probability mass given, at a position
inside a visit after at least one code, to codes with **no** training co-occurrence with any
earlier code of that visit (differentiable, so the model learns to keep mass on plausible
companions),
``+ marginal_weight * KL(f || mean p)``: moment matching of the code marginal, with ``f`` the
training split's code frequencies and ``mean p`` the model's code distribution (renormalised
over codes) averaged over the batch's code positions,
``+ age_weight * MSE(age_head(pooled), age / AGE_SCALE) + sex_weight * CE(sex_head(pooled), sex)``
with ``pooled`` the mean decoder state over target positions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from training.config import AGE_SCALE, ObjectiveConfig
from training.dataset import TOKENS, Batch
from training.model import HierBart

__all__ = ["MARGINAL_ENTRIES", "LossOutput", "code_frequencies", "compute_loss",
           "cooc_operator"]

# The moment-matching term needs the full code distribution at the positions it averages over:
# at most this many (positions x codes) entries per batch, between 128 and 1,024 positions. A
# UCI batch (~600 code positions, 543 codes) uses all of its positions; on a 7,600-code
# vocabulary all 1,024 would double the step time (3.1 s against 1.5 s), 128 add about 15%.
MARGINAL_ENTRIES = 600_000


@dataclass
class LossOutput:
    loss: torch.Tensor
    nll_sum: float  # summed over all target tokens
    n_tokens: int
    code_nll_sum: float  # summed over code targets only
    n_codes: int
    parts: dict[str, float] = field(default_factory=dict)


def cooc_operator(matrix: sp.spmatrix) -> torch.Tensor:
    """The binary co-occurrence pattern as a torch sparse CSR float matrix ``[codes, codes]``."""
    m = sp.csr_matrix(matrix, dtype=np.float32)
    m.data[:] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                       torch.from_numpy(m.indices.astype(np.int64)),
                                       torch.from_numpy(m.data), size=m.shape)


def code_frequencies(counts: np.ndarray) -> torch.Tensor:
    """The moment-matching target: per-code occurrence counts as a distribution (float32)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.sum() <= 0:
        raise ValueError("code_frequencies: need a non-empty vector of code counts")
    return torch.from_numpy(counts / counts.sum()).float()


def _marginal_divergence(log_probs: torch.Tensor, frequencies: torch.Tensor,
                         n_special: int) -> torch.Tensor:
    """``KL(frequencies || mean code distribution)`` of full-vocabulary ``log_probs`` rows taken
    at code positions (each row renormalised over the codes)."""
    code_lp = log_probs[:, n_special:]
    code_lp = code_lp - torch.logsumexp(code_lp, dim=-1, keepdim=True)
    mean_lp = torch.logsumexp(code_lp, dim=0) - math.log(code_lp.shape[0])
    seen = frequencies > 0
    f = frequencies[seen]
    return (f * (f.log() - mean_lp[seen])).sum()


def _code_positions(target: torch.Tensor, n_special: int, cap: int) -> torch.Tensor:
    """Indices of the code targets, evenly thinned to at most ``cap`` (no RNG: the same
    batch gives the same rows, so a resumed run equals an uninterrupted one)."""
    rows = torch.nonzero(target >= n_special).squeeze(1)
    if rows.numel() > cap:
        rows = rows[torch.linspace(0, rows.numel() - 1, cap).round().long()]
    return rows


def _unsupported_mass_penalty(batch: Batch, log_probs: torch.Tensor, valid: torch.Tensor,
                              cooc: torch.Tensor) -> torch.Tensor | None:
    """Mean ``-log(1 - m)`` over in-visit positions that follow at least one code."""
    dec = batch.decoder_input_ids
    b, t = dec.shape
    n_codes = cooc.shape[0]
    is_code = dec >= TOKENS.n_special
    # count codes of the current visit seen so far (the decoder input includes the last target)
    steps = torch.arange(t).expand(b, t)
    visit_start = torch.where(dec == TOKENS.visit, steps, torch.zeros_like(steps)).cummax(1)[0]
    code_cum = is_code.long().cumsum(1)
    in_visit = code_cum - code_cum.gather(1, visit_start)
    labels = batch.labels
    sel = valid & (in_visit > 0) & ((labels >= TOKENS.n_special) | (labels == TOKENS.end_visit))
    if not bool(sel.any()):
        return None
    # rows of the co-occurrence pattern for each code input, summed within the visit
    onehot = torch.zeros(b * t, n_codes)
    rows = torch.nonzero(is_code.reshape(-1)).squeeze(1)
    onehot[rows, dec.reshape(-1)[rows] - TOKENS.n_special] = 1.0
    support = torch.sparse.mm(cooc, onehot.T).T.reshape(b, t, n_codes).cumsum(1)
    start = support.gather(1, visit_start[..., None].expand(-1, -1, n_codes))
    support = (support - start)[sel]  # [N_sel, codes]
    # log_probs rows are the valid positions in order; pick the selected ones among them
    pick = sel[valid]
    code_lp = log_probs[pick][:, TOKENS.n_special:]
    unsupported = (support <= 0.5).to(code_lp.dtype)
    mass = (code_lp.exp() * unsupported).sum(-1).clamp(max=1.0 - 1e-6)
    return -torch.log1p(-mass).mean()


def compute_loss(model: HierBart, batch: Batch, cfg: ObjectiveConfig,
                 cooc: torch.Tensor | None = None,
                 frequencies: torch.Tensor | None = None) -> LossOutput:
    """Loss and sums for one batch (see the module docstring). ``cooc``
    (:func:`cooc_operator`) and ``frequencies`` (:func:`code_frequencies`) are the training
    split's statistics the regularisers need; without them their terms are left out."""
    h = model(batch.input_ids, batch.attention_mask, batch.decoder_input_ids, batch.age,
              batch.sex)
    labels = batch.labels
    valid = labels != TOKENS.pad
    target = labels[valid]
    use_marginal = cfg.marginal_weight > 0 and frequencies is not None
    needs_full = cfg.label_smoothing > 0 or (cfg.cooc_weight > 0 and cooc is not None)
    if needs_full:
        log_probs = model.output_log_probs(h[valid])  # [N, V]
        nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    else:  # the target's terms only: the same value, far cheaper on a large vocabulary
        nll = -model.target_log_probs(h[valid], target)
    loss = nll.mean()
    parts = {"nll": float(loss.detach())}
    if cfg.label_smoothing > 0:
        allowed = (model.output_mask > -1.0) if not model.config.hierarchical else None
        lp = log_probs if allowed is None else log_probs[:, allowed]
        finite = lp > -1e8
        smooth = -(lp * finite).sum(-1) / finite.sum(-1)
        loss = (1 - cfg.label_smoothing) * loss + cfg.label_smoothing * smooth.mean()
    if cfg.cooc_weight > 0 and cooc is not None:
        penalty = _unsupported_mass_penalty(batch, log_probs, valid, cooc)
        if penalty is not None:
            loss = loss + cfg.cooc_weight * penalty
            parts["cooc"] = float(penalty.detach())
    if use_marginal:
        # the full distribution at (a bounded number of) the code positions only: on a large
        # vocabulary the rest of the loss never needs it (target_log_probs)
        cap = min(1024, max(128, MARGINAL_ENTRIES // max(1, frequencies.numel())))
        rows = _code_positions(target, TOKENS.n_special, cap)
        if rows.numel():
            code_lp = log_probs[rows] if needs_full else model.output_log_probs(h[valid][rows])
            divergence = _marginal_divergence(code_lp, frequencies, TOKENS.n_special)
            loss = loss + cfg.marginal_weight * divergence
            parts["marginal"] = float(divergence.detach())
    if model.config.aux_heads and (cfg.age_weight > 0 or cfg.sex_weight > 0):
        w = valid.to(h.dtype)[..., None]
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        if cfg.age_weight > 0:
            age_loss = F.mse_loss(model.age_head(pooled).squeeze(-1), batch.age / AGE_SCALE)
            loss = loss + cfg.age_weight * age_loss
            parts["age"] = float(age_loss.detach())
        if cfg.sex_weight > 0:
            sex_loss = F.cross_entropy(model.sex_head(pooled), batch.sex)
            loss = loss + cfg.sex_weight * sex_loss
            parts["sex"] = float(sex_loss.detach())
    is_code = target >= TOKENS.n_special
    nll_d = nll.detach()
    return LossOutput(loss=loss, nll_sum=float(nll_d.sum()), n_tokens=int(target.numel()),
                      code_nll_sum=float(nll_d[is_code].sum()), n_codes=int(is_code.sum()),
                      parts=parts)
