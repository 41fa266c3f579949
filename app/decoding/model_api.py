"""What the decoder needs from a model: an encoder call and one decoder step at a time.

The decoding loop (:mod:`app.decoding.engine`) is written against the :class:`StepModel`
protocol, so the same grammar, masks and strategies drive the ONNX Runtime graphs in
production (:mod:`app.decoding.onnx_model`), a torch eager model in the benchmark, and the
deliberately untrained :class:`RandomStepModel` that the structure tests use (grammar and
validity must hold whatever the model says).

Conventions (all numpy, no torch on this path):

* ``input_ids`` ``int64 [B, S]`` and ``attention_mask`` ``int64 [B, S]`` are the encoder prompt
  (see :mod:`app.decoding.prompt`); ``age`` ``float32 [B]`` in years, ``sex`` ``int64 [B]``
  with ``0 = F`` and ``1 = M`` (:data:`SEX_IDS`).
* :meth:`StepModel.step` takes the tokens emitted since the last call, ``int64 [B, T]``
  (``T = 1`` after the first call, which feeds ``<s>``), and returns the next-token
  **log-probabilities over every vocabulary token id** as ``float32 [B, V]`` (a hierarchical
  head already multiplied out: log P(chapter) + log P(category | chapter) + log P(code | category)
  for code tokens) with the new state.
* :meth:`StepModel.select` keeps (and reorders) batch rows of a state, so the loop can drop
  finished patients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from app.corpus import SEX_IDS

__all__ = ["SEX_IDS", "RandomStepModel", "StepModel", "log_softmax"]


@runtime_checkable
class StepModel(Protocol):
    """An encoder-decoder over the vocabulary's token ids, driven one step at a time."""

    vocab_size: int

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, age: np.ndarray,
              sex: np.ndarray) -> Any:
        """Run the encoder; return the initial decoder state for ``B`` rows."""

    def step(self, state: Any, tokens: np.ndarray) -> tuple[np.ndarray, Any]:
        """Feed ``tokens`` ``int64 [B, T]``; return ``float32 [B, V]`` log-probs and new state."""

    def select(self, state: Any, rows: np.ndarray) -> Any:
        """The state restricted to (and ordered by) the batch rows ``rows``."""


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


@dataclass
class _RandomState:
    last: np.ndarray  # int64 [B] last token fed
    context: np.ndarray  # float32 [B, V] per-row bias from demographics and prompt


class RandomStepModel:
    """A seeded, untrained bigram model over token ids, conditioned on age, sex and prompt.

    ``log P(next | last) = log_softmax(T[last] + context)`` where ``T`` is a random
    ``V x V`` table (scale ``scale``), and the per-row context adds a random sex vector, an
    age-weighted random vector and ``prompt_weight`` on every code present in the prompt.
    Its outputs are arbitrary on purpose: decoding structure must not depend on training.
    Each row's output depends only on that row's inputs (no batch effects), so results are
    independent of batch composition bit for bit.
    """

    def __init__(self, vocab_size: int, seed: int = 0, scale: float = 2.0,
                 prompt_weight: float = 2.0) -> None:
        rng = np.random.default_rng(seed)
        self.vocab_size = int(vocab_size)
        self.table = (rng.standard_normal((vocab_size, vocab_size)) * scale).astype(np.float32)
        self.sex_vec = (rng.standard_normal((2, vocab_size)) * 0.5).astype(np.float32)
        self.age_vec = (rng.standard_normal(vocab_size) * 0.5).astype(np.float32)
        self.prompt_weight = np.float32(prompt_weight)
        self.n_special = 6

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, age: np.ndarray,
              sex: np.ndarray) -> _RandomState:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch = input_ids.shape[0]
        context = self.sex_vec[np.asarray(sex, dtype=np.int64)] + (
            np.asarray(age, dtype=np.float32)[:, None] / np.float32(90.0)) * self.age_vec
        present = np.zeros((batch, self.vocab_size), dtype=np.float32)
        rows = np.repeat(np.arange(batch), input_ids.shape[1])
        keep = (np.asarray(attention_mask).reshape(-1) > 0) & (
            input_ids.reshape(-1) >= self.n_special)
        present[rows[keep], input_ids.reshape(-1)[keep]] = 1.0
        context = (context + self.prompt_weight * present).astype(np.float32)
        return _RandomState(np.zeros(batch, dtype=np.int64), context)

    def step(self, state: _RandomState, tokens: np.ndarray) -> tuple[np.ndarray, _RandomState]:
        last = np.asarray(tokens, dtype=np.int64)[:, -1]
        logits = self.table[last] + state.context
        return log_softmax(logits).astype(np.float32), _RandomState(last, state.context)

    def select(self, state: _RandomState, rows: np.ndarray) -> _RandomState:
        return _RandomState(state.last[rows], state.context[rows])
