"""A torch eager :class:`~app.decoding.model_api.StepModel` over :class:`HierBart`.

The same numpy decoding loop (:class:`app.decoding.engine.Engine`) drives it, so it is the
reference the ONNX Runtime graphs are checked against (parity tests) and the "torch eager loop
with the same logic" of ``bench/generation.py``. Training side only (imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training.memory import TRIM_EVERY_DECODE_STEPS, release_heap
from training.model import HierBart, PastKeyValues

__all__ = ["TorchStepModel"]


@dataclass
class _TorchState:
    encoder_hidden: torch.Tensor
    encoder_mask: torch.Tensor
    age: torch.Tensor
    sex: torch.Tensor
    past: PastKeyValues | None


class TorchStepModel:
    def __init__(self, model: HierBart) -> None:
        self.model = model.eval()
        self.vocab_size = model.config.n_tokens
        self.device = next(model.parameters()).device
        self.steps = 0  # decoding steps, for giving freed memory back (training.memory)

    def _tensor(self, array: np.ndarray, dtype: np.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(self.device)

    @torch.no_grad()
    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, age: np.ndarray,
              sex: np.ndarray) -> _TorchState:
        age_t = self._tensor(age, np.float32)
        sex_t = self._tensor(sex, np.int64)
        hidden, mask = self.model.encode(self._tensor(input_ids, np.int64),
                                         self._tensor(attention_mask, np.int64), age_t, sex_t)
        return _TorchState(hidden, mask, age_t, sex_t, None)

    @torch.no_grad()
    def step(self, state: _TorchState, tokens: np.ndarray) -> tuple[np.ndarray, _TorchState]:
        self.steps += 1
        if self.steps % TRIM_EVERY_DECODE_STEPS == 0:  # the caches of earlier steps, freed
            release_heap()
        ids = self._tensor(tokens, np.int64)
        h, past = self.model.decoder_hidden(ids, state.age, state.sex, state.encoder_hidden,
                                            state.encoder_mask, state.past)
        log_probs = self.model.output_log_probs(h[:, -1])
        return log_probs.float().cpu().numpy(), _TorchState(state.encoder_hidden, state.encoder_mask,
                                              state.age, state.sex, past)

    def select(self, state: _TorchState, rows: np.ndarray) -> _TorchState:
        idx = self._tensor(rows, np.int64)
        past = None if state.past is None else tuple(
            tuple(t.index_select(0, idx) for t in layer) for layer in state.past)
        return _TorchState(state.encoder_hidden.index_select(0, idx),
                           state.encoder_mask.index_select(0, idx),
                           state.age.index_select(0, idx), state.sex.index_select(0, idx), past)
