"""HALO (Theodorou et al., 2023, "Synthesize high-dimensional longitudinal electronic health
records via hierarchical autoregressive language model", Nature Communications), compact, for
the peer table of ``bench/peers.py``.

No package on the registries these machines reach ships HALO (PyHealth 1.1.6 and 2.0a13 have
no generators; see bench/peers_results.md), so this follows the paper's architecture in
plain torch, shrunk like DESIGN's HALO probe:

- a patient is a sequence of multi-hot visit vectors: a *start* visit carrying the
  demographic labels (sex, age band of :data:`app.evaluation.breakdown.STRATUM_AGE_BANDS`), the
  real visits, and an *end* visit (the end bit set);
- the *visit level*: visit vectors embedded by a linear map plus a position embedding, then a
  causal transformer (``layers`` x ``d_model``), whose output at visit t summarises visits <= t;
- the *code level*: the next visit's bits are generated autoregressively in a fixed order
  (end bit first, then codes by training frequency): ``logit_i = W_h h_t + sum_{j<i} M_ij x_j``
  with M strictly lower triangular (HALO's masked "autoregressive" output layer; one layer here
  where the paper stacks two).

Training minimises the binary cross-entropy of every next-visit bit under teacher forcing;
generation samples the start visit's labels from the requested (age, sex), then visit after
visit, bit after bit, until the end bit or ``max_visits``. Visits HALO leaves empty are
dropped (HALO has no visit grammar; the protocol's well-formed rate shows what remains).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from app.corpus import SEX_IDS, Patient
from app.evaluation.breakdown import STRATUM_AGE_BANDS

__all__ = ["Halo", "HaloData", "generate_halo", "train_halo"]


class HaloData:
    """The bit layout: [end, codes by training frequency..., sex F, sex M, age bands...]."""

    def __init__(self, train: Sequence[Patient]) -> None:
        counts = Counter(c for p in train for v in p.visits for c in set(v))
        self.codes = sorted(counts, key=lambda c: (-counts[c], c))
        self.index = {c: i + 1 for i, c in enumerate(self.codes)}
        self.n_out = 1 + len(self.codes)  # bits that are predicted
        self.n_labels = 2 + len(STRATUM_AGE_BANDS)
        self.n_bits = self.n_out + self.n_labels
        # Sequences are cut at the 99th percentile of visits per patient: a half-trained HALO
        # that never emits the end bit would otherwise run every batch to the longest patient.
        lengths = [len(p.visits) for p in train] or [1]
        self.max_visits = max(1, int(np.ceil(np.percentile(lengths, 99))))

    def labels(self, age: float, sex: str) -> list[int]:
        band = next((i for i, (lo, hi) in enumerate(STRATUM_AGE_BANDS) if lo <= age < hi),
                    len(STRATUM_AGE_BANDS) - 1)
        return [self.n_out + SEX_IDS[sex], self.n_out + 2 + band]

    def encode(self, patients: Sequence[Patient], max_visits: int) -> torch.Tensor:
        """patients x (visits + 2) x bits: start visit, visits, end visit, zero padding."""
        out = torch.zeros(len(patients), max_visits + 2, self.n_bits)
        for i, p in enumerate(patients):
            out[i, 0, self.labels(p.age, p.sex)] = 1.0
            visits = p.visits[:max_visits]
            for t, visit in enumerate(visits, start=1):
                for c in visit:
                    j = self.index.get(c)
                    if j is not None:
                        out[i, t, j] = 1.0
            out[i, len(visits) + 1, 0] = 1.0
        return out


class Halo(nn.Module):
    def __init__(self, n_bits: int, n_out: int, max_positions: int, d_model: int = 256,
                 layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.n_out = n_out
        self.embed = nn.Linear(n_bits, d_model)
        self.position = nn.Embedding(max_positions, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1,
                                           batch_first=True, norm_first=True)
        self.visits = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_out)
        self.masked = nn.Parameter(torch.zeros(n_out, n_out))
        self.register_buffer("mask", torch.tril(torch.ones(n_out, n_out), diagonal=-1))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        h = self.embed(x) + self.position(torch.arange(t))
        return self.visits(h, mask=causal)

    def logits(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits of the next visit's bits given h and the target's earlier bits."""
        return self.head(h) + target @ (self.masked * self.mask).T


def train_halo(data: HaloData, train: Sequence[Patient], *, minutes: float, seed: int = 0,
               d_model: int = 256, layers: int = 4, batch_size: int = 48, lr: float = 3e-4,
               max_visits: int | None = None, log=print) -> tuple[Halo, dict]:
    """Train until the wall-clock budget is spent (whole epochs not required)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    max_visits = max_visits or data.max_visits
    model = Halo(data.n_bits, data.n_out, max_visits + 2, d_model, layers)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    deadline = time.monotonic() + 60 * minutes
    steps = epochs = 0
    last = float("nan")
    model.train()
    while time.monotonic() < deadline:
        order = rng.permutation(len(train))
        for start in range(0, len(order), batch_size):
            batch = [train[i] for i in order[start:start + batch_size]]
            length = min(max(len(p.visits) for p in batch), max_visits)
            x = data.encode(batch, length)
            h = model.hidden(x[:, :-1])
            target = x[:, 1:, :data.n_out]
            loss = loss_fn(model.logits(h, target), target).sum(-1)
            real = (x[:, :-1].sum(-1) > 0).float()  # positions before the end visit
            loss = (loss * real).sum() / real.sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
            last = loss.item()
            if steps % 200 == 0:
                log(f"halo step {steps}: loss {last:.3f}")
            if time.monotonic() >= deadline:
                break
        else:
            epochs += 1
    return model, {"steps": steps, "epochs": epochs, "last_loss": last,
                   "parameters": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def generate_halo(model: Halo, data: HaloData, demographics: Sequence[tuple[float, str]],
                  seed: int = 0, batch_size: int = 256, max_visits: int | None = None
                  ) -> list[Patient]:
    """One patient per (age, sex), in order."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    max_visits = max_visits or data.max_visits
    weight = (model.masked * model.mask)  # [i, j]: effect of bit j on bit i
    out: list[Patient] = []
    for start in range(0, len(demographics), batch_size):
        demo = demographics[start:start + batch_size]
        b = len(demo)
        x = torch.zeros(b, 1, data.n_bits)
        for i, (age, sex) in enumerate(demo):
            x[i, 0, data.labels(age, sex)] = 1.0
        done = torch.zeros(b, dtype=torch.bool)
        visits: list[list[tuple[str, ...]]] = [[] for _ in range(b)]
        for _ in range(max_visits):
            h = model.hidden(x)[:, -1]
            logits = model.head(h)
            bits = torch.zeros(b, data.n_out)
            for i in range(data.n_out):
                p = torch.sigmoid(logits[:, i])
                bit = (torch.rand(b, generator=gen) < p).float()
                bits[:, i] = bit
                rows = torch.nonzero(bit).ravel()
                if rows.numel():  # only the rows that set bit i change (codes are sparse)
                    logits[rows] += weight[:, i][None, :]
            ended = bits[:, 0] > 0
            for r in range(b):
                if done[r] or ended[r]:
                    continue
                codes = tuple(data.codes[j - 1] for j in torch.nonzero(bits[r, 1:]).ravel()
                              .add(1).tolist())
                if codes:
                    visits[r].append(codes)
            done |= ended
            if bool(done.all()):
                break
            step = torch.zeros(b, 1, data.n_bits)
            step[:, 0, :data.n_out] = bits
            x = torch.cat([x, step], dim=1)
        for r, (age, sex) in enumerate(demo):
            out.append(Patient(f"halo-{start + r}", float(age), sex, tuple(visits[r])))
    return out
