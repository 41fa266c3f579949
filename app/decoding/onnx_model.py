"""The production :class:`~app.decoding.model_api.StepModel`: ONNX Runtime over a bundle's graphs.

Runs ``encoder.onnx``, ``decoder_init.onnx`` (first decoder call, demographic prompts prepended)
and ``decoder.onnx`` (one step with the key/value cache) as written by
:func:`training.export.export_onnx`; see that module for the graphs' inputs and outputs. The
state is plain numpy (encoder mask, per-layer cross-attention keys/values computed once, and the
growing self-attention cache), so :meth:`OnnxStepModel.select` is a row gather. No torch.

``decoder.onnx`` comes in two formats, told apart by its inputs: the fused one-token step
(``position_ids``, ``encoder_mask32``: ONNX Runtime's ``MultiHeadAttention`` and other fused
operators; a feed of ``T > 1`` tokens runs ``T`` steps) and the traced torch step of older
bundles (``decoder_input_ids [B, T]``, ``encoder_mask``).

A hierarchical model's decoders return the head's levels; :class:`~app.decoding.hier_head.
HierarchicalHead` (built from the graphs' metadata) normalises them, so :meth:`OnnxStepModel.step`
always returns flat ``[B, V]`` log-probabilities. ``quantize=True`` runs the dynamic int8 decoders
(:func:`quantize_decoders`; made on load where the bundle has none, which needs ``onnx``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["GRAPHS", "HEAD_OUTPUTS", "INT8_GRAPHS", "OnnxStepModel", "quantize_decoders",
           "session_options"]

GRAPHS = ("encoder.onnx", "decoder_init.onnx", "decoder.onnx")
#: dynamic int8 versions of the decoder graphs (``quantize=True``), written by
#: :func:`quantize_decoders` (or made on first use where the bundle lacks them)
INT8_GRAPHS = {"decoder_init.onnx": "decoder_init.int8.onnx", "decoder.onnx": "decoder.int8.onnx"}
#: a hierarchical decoder's first outputs: the head's levels, normalised by HierarchicalHead
HEAD_OUTPUTS = ("top_log_probs", "category_logits", "category_max", "category_exp",
                "code_logits", "code_max", "code_exp")
META_N_SPECIAL = "synthehr.n_special"
META_CODE_CATEGORY = "synthehr.code_category"
META_CATEGORY_CHAPTER = "synthehr.category_chapter"


def session_options(intra_op_threads: int = 1, spinning: bool = False):
    """ONNX Runtime options: all graph optimisations, ``intra_op_threads`` threads per call,
    sequential execution. ``spinning``: let idle pool threads spin (faster on dedicated cores,
    much slower when the cores are shared with other work, as in a service with a worker)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass
class _OrtState:
    encoder_hidden: np.ndarray | None  # only until the first step
    encoder_mask: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    past: list[np.ndarray] | None  # per layer: key, value (self attention)
    cross: list[np.ndarray] | None  # per layer: key, value (cross attention)
    position: int = 0  # decoder tokens fed so far (the next token's position id)
    encoder_mask32: np.ndarray | None = None  # int32 copy of encoder_mask (fused step graph)


def quantize_decoders(directory: str | Path, out_dir: str | Path | None = None) -> list[str]:
    """Write :data:`INT8_GRAPHS`: ONNX Runtime dynamic int8 quantization of the decoders.

    Weights of the ``MatMul`` nodes become int8 (per channel), activations are quantized per
    call; embeddings (``Gather``) and the rest stay fp32. Needs the ``onnx`` package.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    directory = Path(directory)
    out_dir = Path(out_dir) if out_dir is not None else directory
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src, dst in INT8_GRAPHS.items():
        # DefaultTensorType: the fused step graph's com.microsoft outputs carry no inferred type
        quantize_dynamic(str(directory / src), str(out_dir / dst), op_types_to_quantize=["MatMul"],
                         per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        # keep the hierarchy metadata (HierarchicalHead) of the fp32 graph
        meta = {p.key: p.value for p in onnx.load(str(directory / src),
                                                  load_external_data=False).metadata_props}
        if meta:
            graph = onnx.load(str(out_dir / dst))
            present = {p.key for p in graph.metadata_props}
            for key, value in meta.items():
                if key not in present:
                    entry = graph.metadata_props.add()
                    entry.key, entry.value = key, value
            onnx.save(graph, str(out_dir / dst))
        written.append(dst)
    return written


class OnnxStepModel:
    """Encoder + decoder-with-cache graphs of one bundle folder.

    ``intra_op_threads``: ONNX Runtime threads per call (graph optimisation level ALL,
    sequential execution). ``quantize``: run the int8 decoders (:data:`INT8_GRAPHS`; made with
    :func:`quantize_decoders` in a temporary folder where the bundle lacks them).
    """

    def __init__(self, directory: str | Path, intra_op_threads: int = 1,
                 providers: list[str] | None = None, quantize: bool = False) -> None:
        import onnxruntime as ort

        directory = Path(directory)
        options = session_options(intra_op_threads)
        providers = providers or ["CPUExecutionProvider"]
        names = {name: directory / name for name in GRAPHS}
        self._tmp = None
        if quantize:
            if not all((directory / q).is_file() for q in INT8_GRAPHS.values()):
                import tempfile

                self._tmp = tempfile.TemporaryDirectory(prefix="synthehr-int8-")
                try:
                    quantize_decoders(directory, self._tmp.name)
                except ImportError as err:
                    raise RuntimeError(
                        f"quantize=True: {directory} has no int8 decoders and quantizing them "
                        f"here needs the onnx package ({err}); write them at export with "
                        "training.export.export_onnx(..., quantize=True)") from None
                base = Path(self._tmp.name)
            else:
                base = directory
            names.update({src: base / dst for src, dst in INT8_GRAPHS.items()})
        self.quantized = bool(quantize)
        self.encoder = ort.InferenceSession(str(names["encoder.onnx"]), options,
                                            providers=providers)
        self.decoder_init = ort.InferenceSession(str(names["decoder_init.onnx"]), options,
                                                 providers=providers)
        self.decoder = ort.InferenceSession(str(names["decoder.onnx"]), options,
                                            providers=providers)
        self._init_outputs = [o.name for o in self.decoder_init.get_outputs()]
        self._step_inputs = [i.name for i in self.decoder.get_inputs()]
        #: the fused one-token step graph (else the traced step of older bundles)
        self.fused_step = "position_ids" in self._step_inputs
        self._step_outputs = [o.name for o in self.decoder.get_outputs()]
        self.n_layers = sum(1 for n in self._step_outputs if n.startswith("present_key"))
        self.head = None
        self.n_head = 1
        if tuple(self._step_outputs[:len(HEAD_OUTPUTS)]) == HEAD_OUTPUTS:
            from app.decoding.hier_head import HierarchicalHead

            meta = self.decoder.get_modelmeta().custom_metadata_map
            self.head = HierarchicalHead(int(meta[META_N_SPECIAL]),
                                         np.asarray(json.loads(meta[META_CODE_CATEGORY])),
                                         np.asarray(json.loads(meta[META_CATEGORY_CHAPTER])))
            self.n_head = len(HEAD_OUTPUTS)
            self.vocab_size = self.head.vocab_size
        else:
            width = self.decoder.get_outputs()[0].shape[1]
            self.vocab_size = int(width) if isinstance(width, int) else None

    def _log_probs(self, outputs: list[np.ndarray]) -> np.ndarray:
        if self.head is None:
            return outputs[0]
        return self.head.log_probs(*outputs[:len(HEAD_OUTPUTS)])

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
            log_probs, rest = self._log_probs(outputs), outputs[self.n_head:]
            past = [t for i in range(self.n_layers) for t in rest[4 * i: 4 * i + 2]]
            cross = [t for i in range(self.n_layers) for t in rest[4 * i + 2: 4 * i + 4]]
            mask32 = state.encoder_mask.astype(np.int32) if self.fused_step else None
            return log_probs, _OrtState(None, state.encoder_mask, state.age, state.sex, past,
                                        cross, tokens.shape[1], mask32)
        if self.fused_step:
            for t in range(tokens.shape[1]):  # one token per call (causal: the same result)
                log_probs, state = self._fused_step(state, tokens[:, t: t + 1])
            return log_probs, state
        feed = {"decoder_input_ids": tokens, "encoder_mask": state.encoder_mask}
        feed.update(self._cache_feed(state))
        outputs = self.decoder.run(None, feed)
        return self._log_probs(outputs), _OrtState(None, state.encoder_mask, state.age,
                                                   state.sex, outputs[self.n_head:], state.cross,
                                                   state.position + tokens.shape[1])

    def _cache_feed(self, state: _OrtState) -> dict[str, np.ndarray]:
        """The self-attention past and the cross-attention keys/values of every layer, by the
        input names both step graphs (traced and fused) share."""
        feed = {}
        for i in range(self.n_layers):
            feed[f"past_key_{i}"] = state.past[2 * i]
            feed[f"past_value_{i}"] = state.past[2 * i + 1]
            feed[f"cross_key_{i}"] = state.cross[2 * i]
            feed[f"cross_value_{i}"] = state.cross[2 * i + 1]
        return feed

    def _fused_step(self, state: _OrtState, tokens: np.ndarray,
                    ) -> tuple[np.ndarray, _OrtState]:
        feed = {"decoder_input_ids": np.ascontiguousarray(tokens),
                "position_ids": np.full((1, 1), state.position, dtype=np.int64),
                "encoder_mask32": state.encoder_mask32}
        feed.update(self._cache_feed(state))
        outputs = self.decoder.run(None, feed)
        return self._log_probs(outputs), _OrtState(None, state.encoder_mask, state.age,
                                                   state.sex, outputs[self.n_head:], state.cross,
                                                   state.position + 1, state.encoder_mask32)

    def select(self, state: _OrtState, rows: np.ndarray) -> _OrtState:
        rows = np.asarray(rows, dtype=np.int64)
        take = (lambda a: None if a is None else a[rows])
        return _OrtState(take(state.encoder_hidden), state.encoder_mask[rows],
                         state.age[rows], state.sex[rows],
                         None if state.past is None else [a[rows] for a in state.past],
                         None if state.cross is None else [a[rows] for a in state.cross],
                         state.position, take(state.encoder_mask32))
