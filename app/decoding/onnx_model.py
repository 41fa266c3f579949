"""The production :class:`~app.decoding.model_api.StepModel`: ONNX Runtime over a bundle's graphs.

Runs ``encoder.onnx``, ``decoder_init.onnx`` (first decoder call, demographic prompts prepended)
and ``decoder.onnx`` (one step with the key/value cache) as written by
:func:`training.export.export_onnx`; see that module for the graphs' inputs and outputs. The
state is plain numpy (encoder mask, per-layer cross-attention keys/values computed once, and the
growing self-attention cache), so :meth:`OnnxStepModel.select` is a row gather. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["GRAPHS", "OnnxStepModel", "session_options"]

GRAPHS = ("encoder.onnx", "decoder_init.onnx", "decoder.onnx")


def session_options(intra_op_threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


@dataclass
class _OrtState:
    encoder_hidden: np.ndarray | None  # only until the first step
    encoder_mask: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    past: list[np.ndarray] | None  # per layer: key, value (self attention)
    cross: list[np.ndarray] | None  # per layer: key, value (cross attention)


class OnnxStepModel:
    """Encoder + decoder-with-cache graphs of one bundle folder."""

    def __init__(self, directory: str | Path, intra_op_threads: int = 1,
                 providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        directory = Path(directory)
        options = session_options(intra_op_threads)
        providers = providers or ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(directory / "encoder.onnx"), options,
                                            providers=providers)
        self.decoder_init = ort.InferenceSession(str(directory / "decoder_init.onnx"), options,
                                                 providers=providers)
        self.decoder = ort.InferenceSession(str(directory / "decoder.onnx"), options,
                                            providers=providers)
        self._init_outputs = [o.name for o in self.decoder_init.get_outputs()]
        self._step_inputs = [i.name for i in self.decoder.get_inputs()]
        self._step_outputs = [o.name for o in self.decoder.get_outputs()]
        self.n_layers = sum(1 for n in self._step_outputs if n.startswith("present_key"))
        self.vocab_size = int(self.decoder.get_outputs()[0].shape[1]) \
            if isinstance(self.decoder.get_outputs()[0].shape[1], int) else None

    def start(self, input_ids: np.ndarray, attention_mask: np.ndarray, age: np.ndarray,
              sex: np.ndarray) -> _OrtState:
        age = np.asarray(age, dtype=np.float32)
        sex = np.asarray(sex, dtype=np.int64)
        hidden, mask = self.encoder.run(None, {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "age": age, "sex": sex})
        return _OrtState(hidden, mask.astype(np.int64), age, sex, None, None)

    def step(self, state: _OrtState, tokens: np.ndarray) -> tuple[np.ndarray, _OrtState]:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if state.past is None:
            outputs = self.decoder_init.run(None, {
                "decoder_input_ids": tokens, "age": state.age, "sex": state.sex,
                "encoder_hidden": state.encoder_hidden, "encoder_mask": state.encoder_mask})
            log_probs, rest = outputs[0], outputs[1:]
            past = [t for i in range(self.n_layers) for t in rest[4 * i: 4 * i + 2]]
            cross = [t for i in range(self.n_layers) for t in rest[4 * i + 2: 4 * i + 4]]
            return log_probs, _OrtState(None, state.encoder_mask, state.age, state.sex, past,
                                        cross)
        feed = {"decoder_input_ids": tokens, "encoder_mask": state.encoder_mask}
        for i in range(self.n_layers):
            feed[f"past_key_{i}"] = state.past[2 * i]
            feed[f"past_value_{i}"] = state.past[2 * i + 1]
            feed[f"cross_key_{i}"] = state.cross[2 * i]
            feed[f"cross_value_{i}"] = state.cross[2 * i + 1]
        outputs = self.decoder.run(None, feed)
        return outputs[0], _OrtState(None, state.encoder_mask, state.age, state.sex,
                                     outputs[1:], state.cross)

    def select(self, state: _OrtState, rows: np.ndarray) -> _OrtState:
        rows = np.asarray(rows, dtype=np.int64)
        take = (lambda a: None if a is None else a[rows])
        return _OrtState(take(state.encoder_hidden), state.encoder_mask[rows],
                         state.age[rows], state.sex[rows],
                         None if state.past is None else [a[rows] for a in state.past],
                         None if state.cross is None else [a[rows] for a in state.cross])
