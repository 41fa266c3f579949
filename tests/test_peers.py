"""The HALO peer of bench/peers.py (bench/halo_peer.py) on a tiny corpus: it trains for a few
seconds, learns the bit layout and generates one patient per requested (age, sex)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from app.corpus import Patient

pytest.importorskip("torch")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))

from halo_peer import HaloData, generate_halo, train_halo


def _corpus(n: int) -> list[Patient]:
    rng = np.random.default_rng(0)
    pool = ["25000", "4019", "4280", "41401", "42731"]
    return [Patient(f"p{i}", float(rng.integers(20, 90)), "F" if i % 2 else "M",
                    tuple(tuple(rng.choice(pool, rng.integers(1, 3), replace=False))
                          for _ in range(rng.integers(1, 3)))) for i in range(n)]


def test_halo_layout_trains_and_generates():
    train = _corpus(80)
    data = HaloData(train)
    assert data.n_out == 1 + 5 and data.codes[0] in {"25000", "4019", "4280", "41401", "42731"}
    x = data.encode(train[:2], data.max_visits)
    assert x.shape == (2, data.max_visits + 2, data.n_bits)
    assert x[0, 0, data.n_out:].sum() == 2  # sex and age band in the start visit
    end = len(train[0].visits) + 1
    assert x[0, end, 0] == 1 and x[0, 1:end, 0].sum() == 0  # the end bit after the visits
    model, info = train_halo(data, train, minutes=0.05, d_model=32, layers=1, batch_size=16)
    assert info["steps"] > 0 and np.isfinite(info["last_loss"])
    demographics = [(70.0, "F"), (30.0, "M"), (55.0, "F")]
    out = generate_halo(model, data, demographics, seed=1)
    assert [(p.age, p.sex) for p in out] == demographics
    assert all(c in data.index for p in out for v in p.visits for c in v)
    assert all(len(p.visits) <= data.max_visits for p in out)
