"""Contrastive pretraining of the code embeddings on the training co-occurrence matrix.

Before the model is trained, its code embeddings (``token_embed`` rows of the codes, which the
hierarchical head also uses as output weights) are fitted with InfoNCE: pairs of codes ``(a, b)``
are drawn in proportion to how many training visits hold both, and ``a``'s normalised
embedding must pick ``b``'s out of the batch's other partners. Codes that keep company start
close, which is what the ``objective.contrastive_steps`` ablation measures. The rows keep their
initial mean norm, so the rest of the model sees embeddings of the scale it was initialised for.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from training.model import HierBart

__all__ = ["pretrain_code_embeddings"]


def pretrain_code_embeddings(model: HierBart, cooccurrence: sp.spmatrix, steps: int, *,
                             seed: int, batch_size: int = 1024, lr: float = 1e-2,
                             temperature: float = 0.1) -> dict[str, float]:
    """Fit the code rows of ``model.token_embed`` for ``steps`` InfoNCE steps; returns the first
    and last batch losses (the loss of a batch of ``batch_size`` pairs, chance ``log batch``)."""
    pairs = sp.triu(sp.coo_matrix(cooccurrence), k=1).tocoo()
    if steps <= 0 or pairs.nnz == 0:
        return {"steps": 0}
    weights = pairs.data.astype(np.float64)
    weights /= weights.sum()
    n_special = model.config.n_special
    table = model.token_embed.weight
    codes = slice(n_special, n_special + model.config.n_codes)
    with torch.no_grad():
        start_norm = table[codes].norm(dim=-1).mean()
    device = table.device
    rows = torch.from_numpy(pairs.row.astype(np.int64)).to(device) + n_special
    cols = torch.from_numpy(pairs.col.astype(np.int64)).to(device) + n_special
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam([table], lr=lr)
    losses = []
    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(weights.size, size=batch_size, p=weights)).to(device)
        # both directions: each pair's order in the upper triangle carries no meaning
        a = torch.cat([rows[pick], cols[pick]])
        b = torch.cat([cols[pick], rows[pick]])
        za = F.normalize(table[a], dim=-1)
        zb = F.normalize(table[b], dim=-1)
        logits = za @ zb.T / temperature
        loss = F.cross_entropy(logits, torch.arange(a.numel(), device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        rows_now = table[codes]
        table[codes] = rows_now * (start_norm / rows_now.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    table.grad = None
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
            "chance_loss": float(np.log(2 * batch_size))}
