"""Seconds per training step of the UCI-sized model at 1 and 2 torch threads, interleaved.

    .venv/bin/python bench/train_threads.py [--steps 20] [--rounds 2]

Times ``--steps`` optimizer steps (batch 256, the UCI recipe's model) per thread count, in
alternating rounds, and prints the best round of each. On a machine whose cores are busy with
other work, two OpenMP threads can be far slower than one (each step waits for the slower
thread), which is why the trainer defaults to one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from app.corpus import Patient
from app.vocab import Vocabulary
from training.config import ObjectiveConfig, model_config_for
from training.dataset import collate, encode_patients
from training.model import HierBart
from training.objective import compute_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    codes = [f"{c:03d}" for c in range(250, 750)]
    patients = [Patient(str(i), float(rng.integers(20, 90)), "FM"[i % 2],
                        tuple(tuple(rng.choice(codes, size=3, replace=False).tolist())
                              for _ in range(int(rng.integers(1, 3)))))
                for i in range(256 * 4)]
    vocab = Vocabulary.from_patients(patients)
    model = HierBart(model_config_for("small", ffn_dim=256, max_positions=64), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    enc = encode_patients(patients, vocab, 64)
    objective = ObjectiveConfig()
    best: dict[int, float] = {}
    for _ in range(args.rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            for step in range(args.steps):
                batch = collate(enc[(step % 4) * 256:(step % 4 + 1) * 256], rng, objective)
                loss = compute_loss(model, batch, objective).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            per_step = (time.perf_counter() - start) / args.steps
            best[threads] = min(best.get(threads, np.inf), per_step)
    for threads, seconds in best.items():
        print(f"threads {threads}: {seconds * 1000:.0f} ms per step (best of {args.rounds})")
    print(f"2 threads / 1 thread time ratio: {best[2] / best[1]:.2f}")


if __name__ == "__main__":
    main()
