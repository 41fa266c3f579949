"""Export a trained :class:`~training.model.HierBart` to the ONNX graphs the service runs.

Three graphs, exported with ``torch.onnx.export`` directly (TorchScript exporter, opset 18,
dynamic batch / sequence / cache axes):

``encoder.onnx``
    ``input_ids [B, S] int64, attention_mask [B, S] int64, age [B] float32, sex [B] int64``
    -> ``encoder_hidden [B, E, d], encoder_mask [B, E] int64`` (``E = S`` + prompt positions).
``decoder_init.onnx``
    the first decoder call (it prepends the demographic prompts): ``decoder_input_ids [B, T],
    age, sex, encoder_hidden, encoder_mask`` -> the head's outputs for the next token after the
    last input (below), ``present_key_i, present_value_i [B, H, P + T, dh]`` (self-attention
    cache) and ``cross_key_i, cross_value_i [B, H, E, dh]`` for each decoder layer ``i``.
``decoder.onnx``
    every later step, one token per call, built node by node (:func:`fused_step_graph`) with
    ONNX Runtime's fused CPU operators (``com.microsoft``): ``MultiHeadAttention`` over the
    self-attention cache (past key/value in, present out) and over the cross-attention keys and
    values, ``SkipLayerNormalization`` (residual + bias + LayerNorm), ``BiasGelu``, one packed
    Q/K/V projection per layer and, for a hierarchical head, one projection for its three
    levels. Inputs: ``decoder_input_ids [B, 1], position_ids [1, 1]`` (the new token's
    position), ``encoder_mask32 [B, E] int32, past_key_i, past_value_i, cross_key_i,
    cross_value_i`` -> the head's outputs, ``present_key_i, present_value_i``. About 50 nodes
    against 260 for the traced graph (which spent most of a batch-1 step on shape arithmetic,
    unfused bias adds and attention): ``bench/generation_results.md``.
    ``fused_step=False`` (or an activation other than GELU / ReLU) exports the traced torch step
    instead (``decoder_input_ids [B, T], encoder_mask, past_key_i, ...``, the format of bundles
    written before the fused graph); :class:`~app.decoding.onnx_model.OnnxStepModel` runs both.

The head's outputs: a flat model gives ``log_probs [B, V]``. A hierarchical model gives the
levels before their segment normalisation (:data:`~app.decoding.onnx_model.HEAD_OUTPUTS`:
``top_log_probs``, ``category_logits``, ``category_max``, ``category_exp``, ``code_logits``,
``code_max``, ``code_exp``; see :mod:`app.decoding.hier_head`), and the graphs carry the code ->
category -> chapter arrays as metadata; :class:`~app.decoding.hier_head.HierarchicalHead` turns
them into the same flat log-probabilities as :meth:`HierBart.output_log_probs` (parity within
1e-4 is tested). The in-graph segment log-sum-exp (``ScatterElements``) cost about a third of a
step in ONNX Runtime; contiguous segments make it a cheap sparse sum in numpy.

``quantize=True`` also writes ONNX Runtime dynamic int8 versions of the two decoders
(``decoder_init.int8.onnx``, ``decoder.int8.onnx``; ``Engine.from_bundle(..., quantize=True)``
runs them). :func:`export_onnx` writes into a bundle folder and registers the checksums in its
manifest (where there is one); :mod:`app.decoding.onnx_model` runs the graphs without torch.
Extra demographic features (:attr:`ModelConfig.extra_features`) are not exported yet.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from app.decoding.hier_head import contiguous_segments
from app.decoding.onnx_model import (
    GRAPHS,
    HEAD_OUTPUTS,
    INT8_GRAPHS,
    META_CATEGORY_CHAPTER,
    META_CODE_CATEGORY,
    META_N_SPECIAL,
    quantize_decoders,
)
from training.model import HierBart

__all__ = ["GRAPHS", "OPSET", "export_onnx", "fused_step_graph"]

OPSET = 18
#: activations the fused step graph implements (``BiasGelu`` is the exact, erf GELU)
_FUSED_ACTIVATIONS = ("gelu", "relu")


class _Encoder(nn.Module):
    def __init__(self, model: HierBart) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, age, sex):
        return self.model.encode(input_ids, attention_mask, age, sex)


class _DecoderInit(nn.Module):
    def __init__(self, model: HierBart) -> None:
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, age, sex, encoder_hidden, encoder_mask):
        h, past = self.model.decoder_hidden(decoder_input_ids, age, sex, encoder_hidden,
                                            encoder_mask, None)
        flat = [t for layer in past for t in layer]
        return (*_head(self.model, h[:, -1]), *flat)


class _DecoderStep(nn.Module):
    def __init__(self, model: HierBart) -> None:
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_mask, *past_flat):
        past = tuple(tuple(past_flat[4 * i: 4 * i + 4]) for i in range(len(past_flat) // 4))
        h, new_past = self.model.decoder_hidden(decoder_input_ids, None, None, None,
                                                encoder_mask, past)
        return (*_head(self.model, h[:, -1]), *[t for layer in new_past for t in layer[:2]])


def _head(model: HierBart, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flat log-probs, or the hierarchical head's three levels (normalised in numpy)."""
    if model.config.hierarchical:
        top, cat_logits, code_logits = model.level_logits(h)
        out = [top]
        for logits in (cat_logits, code_logits):  # exp in the graph (vectorised), sums in numpy
            peak = logits.amax(dim=-1, keepdim=True)
            # transposed, [n, B]: the segment sums are then a CSR x C-contiguous product
            out += [logits, peak, torch.exp(logits - peak).transpose(0, 1)]
        return tuple(out)
    return (model.output_log_probs(h),)


def _head_names(model: HierBart) -> list[str]:
    return list(HEAD_OUTPUTS) if model.config.hierarchical else ["log_probs"]


def _hierarchy_metadata(model: HierBart) -> dict[str, str]:
    """What :class:`~app.decoding.hier_head.HierarchicalHead` needs, as ONNX metadata."""
    c = model.config
    code_category = model.code_category.cpu().numpy()
    category_chapter = model.category_chapter.cpu().numpy()
    # fails here, at export, rather than at serving time if the order is not contiguous
    contiguous_segments(code_category, "code -> category")
    contiguous_segments(category_chapter, "category -> chapter")
    return {META_N_SPECIAL: str(c.n_special),
            META_CODE_CATEGORY: json.dumps(code_category.tolist()),
            META_CATEGORY_CHAPTER: json.dumps(category_chapter.tolist())}


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def _layer_names(n_layers: int, kinds: tuple[str, ...]) -> list[str]:
    return [f"{kind}_{i}" for i in range(n_layers) for kind in kinds]


def export_onnx(model: HierBart, bundle_dir: str | Path, opset: int = OPSET,
                quantize: bool = False, fused_step: bool = True) -> list[str]:
    """Write :data:`GRAPHS` into ``bundle_dir`` (registered in its manifest if it has one).

    ``quantize``: also write the dynamic int8 decoders (:data:`INT8_GRAPHS`, see
    :func:`~app.decoding.onnx_model.quantize_decoders`); without it, stale ones are removed.
    ``fused_step``: ``decoder.onnx`` is :func:`fused_step_graph` (where the model's activation
    allows it); ``False``: the traced torch step, as older bundles have it.
    Returns the file names written.
    """
    if model.config.extra_features:
        raise NotImplementedError("ONNX export of extra demographic features is not supported")
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model = model.eval()
    n_layers = model.config.decoder_layers
    batch, steps = 2, 3
    input_ids = torch.tensor([[1, 3, 6, 4, 2], [1, 2, 0, 0, 0]], dtype=torch.long)
    input_ids = input_ids.clamp_max(model.config.n_tokens - 1)
    attention_mask = (input_ids != 0).long()
    attention_mask[:, 0] = 1
    age = torch.tensor([40.0, 3.0])
    sex = torch.tensor([0, 1], dtype=torch.long)
    dec_ids = torch.tensor([[1], [1]], dtype=torch.long)
    written = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc_h, enc_mask = model.encode(input_ids, attention_mask, age, sex)
        _export(_Encoder(model), (input_ids, attention_mask, age, sex),
                bundle_dir / "encoder.onnx",
                ["input_ids", "attention_mask", "age", "sex"],
                ["encoder_hidden", "encoder_mask"],
                {"input_ids": {0: "batch", 1: "source"},
                 "attention_mask": {0: "batch", 1: "source"}, "age": {0: "batch"},
                 "sex": {0: "batch"}, "encoder_hidden": {0: "batch", 1: "encoded"},
                 "encoder_mask": {0: "batch", 1: "encoded"}}, opset)
        written.append("encoder.onnx")

        present = _layer_names(n_layers, ("present_key", "present_value", "cross_key",
                                          "cross_value"))
        axes = {"decoder_input_ids": {0: "batch", 1: "new"}, "age": {0: "batch"},
                "sex": {0: "batch"}, "encoder_hidden": {0: "batch", 1: "encoded"},
                "encoder_mask": {0: "batch", 1: "encoded"}}
        heads = _head_names(model)
        axes.update({name: {0: "batch"} for name in heads})
        for name in present:
            axes[name] = {0: "batch", 2: "encoded" if name.startswith("cross") else "total"}
        _export(_DecoderInit(model), (dec_ids, age, sex, enc_h, enc_mask),
                bundle_dir / "decoder_init.onnx",
                ["decoder_input_ids", "age", "sex", "encoder_hidden", "encoder_mask"],
                [*heads, *present], axes, opset)
        written.append("decoder_init.onnx")

        _, past = model.decoder_hidden(torch.ones(batch, steps, dtype=torch.long), age, sex,
                                       enc_h, enc_mask, None)
        past_flat = [t for layer in past for t in layer]
        past_names = _layer_names(n_layers, ("past_key", "past_value", "cross_key",
                                             "cross_value"))
        out_names = _layer_names(n_layers, ("present_key", "present_value"))
        axes = {"decoder_input_ids": {0: "batch", 1: "new"},
                "encoder_mask": {0: "batch", 1: "encoded"}}
        axes.update({name: {0: "batch"} for name in heads})
        for name in past_names:
            axes[name] = {0: "batch", 2: "encoded" if name.startswith("cross") else "past"}
        for name in out_names:
            axes[name] = {0: "batch", 2: "total"}
        if fused_step and model.config.activation_function in _FUSED_ACTIVATIONS:
            import onnx

            onnx.save(fused_step_graph(model, opset), str(bundle_dir / "decoder.onnx"))
        else:
            _export(_DecoderStep(model), (dec_ids, enc_mask, *past_flat),
                    bundle_dir / "decoder.onnx",
                    ["decoder_input_ids", "encoder_mask", *past_names],
                    [*heads, *out_names], axes, opset)
        written.append("decoder.onnx")
    if model.config.hierarchical:
        metadata = _hierarchy_metadata(model)
        for name in ("decoder_init.onnx", "decoder.onnx"):
            _add_metadata(bundle_dir / name, metadata)
    model.train(was_training)
    for name in INT8_GRAPHS.values():
        (bundle_dir / name).unlink(missing_ok=True)  # never pair int8 graphs of other weights
    if quantize:
        written += quantize_decoders(bundle_dir)
    if (bundle_dir / "manifest.json").is_file():
        from app.bundle import read_manifest
        from training.bundle import add_bundle_file, write_manifest

        manifest = read_manifest(bundle_dir)
        stale = [n for n in INT8_GRAPHS.values() if n in manifest["files"] and n not in written]
        if stale:
            for name in stale:
                del manifest["files"][name]
            write_manifest(bundle_dir, manifest)
        for name in written:
            add_bundle_file(bundle_dir, name)
    return written


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict, opset: int) -> None:
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=axes, opset_version=opset, dynamo=False,
                      do_constant_folding=True)


def fused_step_graph(model: HierBart, opset: int = OPSET):
    """The one-token decoder step as an ONNX graph built node by node (see the module docstring).

    Same computation as :meth:`HierBart.decoder_hidden` with a cache followed by the head
    (:func:`_head`), with ONNX Runtime's fused CPU operators: per layer a packed Q/K/V
    ``MatMul`` + ``Add``, ``MultiHeadAttention`` (self: past key/value ``[B, H, P, dh]`` in,
    present ``[B, H, P + 1, dh]`` out; cross: the cached ``[B, H, E, dh]`` keys and values with
    the encoder mask as key padding mask), ``SkipLayerNormalization`` after each block with the
    projection bias folded in, ``BiasGelu`` (or ``Add`` + ``Relu``). The token table holds each
    token's full input embedding (a hierarchical model's token + category + chapter vectors,
    summed in the model's order). Float results match the traced graph to ~1e-6.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = model.config
    if c.activation_function not in _FUSED_ACTIVATIONS:
        raise ValueError(f"fused step graph: activation {c.activation_function!r} not supported")
    d, heads = c.d_model, c.attention_heads
    dh = d // heads
    ms = "com.microsoft"
    initializers: list = []
    nodes: list = []

    def arr(t) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32) if isinstance(t, torch.Tensor) \
            else np.asarray(t)

    def const(name: str, value) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr(value)), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str | None = None,
             **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))
        return outputs[0]

    def linear_t(weight: torch.Tensor) -> np.ndarray:  # nn.Linear weight [out, in] -> [in, out]
        return arr(weight).T

    def skip_norm(x: str, skip: str, norm: nn.LayerNorm, bias: torch.Tensor, name: str) -> str:
        return node("SkipLayerNormalization",
                    [x, skip, const(f"{name}.gamma", norm.weight),
                     const(f"{name}.beta", norm.bias), const(f"{name}.bias", bias)],
                    [name], domain=ms, epsilon=float(norm.eps))

    with torch.no_grad():
        table = model.embed_tokens(torch.arange(c.n_tokens))
    x = node("Gather", [const("token_table", table), "decoder_input_ids"], ["token_embedding"])
    pos = node("Gather", [const("position_table", model.position_embed.weight), "position_ids"],
               ["position_embedding"])
    x = node("Add", [x, pos], ["embedding"])
    norm = model.decoder_embed_norm
    h = node("LayerNormalization", [x, const("embed_norm.gamma", norm.weight),
                                    const("embed_norm.beta", norm.bias)],
             ["embed_norm"], axis=-1, epsilon=float(norm.eps))
    present = []
    for i, layer in enumerate(model.decoder_layers):
        sa, ca = layer.self_attn, layer.encoder_attn
        w_qkv = np.concatenate([linear_t(sa.q_proj.weight), linear_t(sa.k_proj.weight),
                                linear_t(sa.v_proj.weight)], axis=1)
        b_qkv = np.concatenate([arr(sa.q_proj.bias), arr(sa.k_proj.bias), arr(sa.v_proj.bias)])
        qkv = node("MatMul", [h, const(f"l{i}.qkv.w", w_qkv)], [f"l{i}.qkv.mm"])
        qkv = node("Add", [qkv, const(f"l{i}.qkv.b", b_qkv)], [f"l{i}.qkv"])
        q, k, v = (f"l{i}.q", f"l{i}.k", f"l{i}.v")
        node("Split", [qkv, const(f"l{i}.qkv.split", np.array([d, d, d], np.int64))],
             [q, k, v], axis=-1)
        present += [f"present_key_{i}", f"present_value_{i}"]
        att = node("MultiHeadAttention", [q, k, v, "", "", "", f"past_key_{i}", f"past_value_{i}"],
                   [f"l{i}.self", *present[-2:]], domain=ms, num_heads=heads)
        att = node("MatMul", [att, const(f"l{i}.self.out.w", linear_t(sa.out_proj.weight))],
                   [f"l{i}.self.out"])
        h = skip_norm(att, h, layer.self_attn_layer_norm, sa.out_proj.bias, f"l{i}.norm1")
        q = node("MatMul", [h, const(f"l{i}.cross.q.w", linear_t(ca.q_proj.weight))],
                 [f"l{i}.cross.q.mm"])
        q = node("Add", [q, const(f"l{i}.cross.q.b", ca.q_proj.bias)], [f"l{i}.cross.q"])
        att = node("MultiHeadAttention", [q, f"cross_key_{i}", f"cross_value_{i}", "",
                                          "encoder_mask32"],
                   [f"l{i}.cross"], domain=ms, num_heads=heads)
        att = node("MatMul", [att, const(f"l{i}.cross.out.w", linear_t(ca.out_proj.weight))],
                   [f"l{i}.cross.out"])
        h = skip_norm(att, h, layer.encoder_attn_layer_norm, ca.out_proj.bias, f"l{i}.norm2")
        f = node("MatMul", [h, const(f"l{i}.fc1.w", linear_t(layer.fc1.weight))],
                 [f"l{i}.fc1"])
        if c.activation_function == "gelu":
            f = node("BiasGelu", [f, const(f"l{i}.fc1.b", layer.fc1.bias)], [f"l{i}.act"],
                     domain=ms)
        else:
            f = node("Add", [f, const(f"l{i}.fc1.b", layer.fc1.bias)], [f"l{i}.fc1.biased"])
            f = node("Relu", [f], [f"l{i}.act"])
        f = node("MatMul", [f, const(f"l{i}.fc2.w", linear_t(layer.fc2.weight))],
                 [f"l{i}.fc2"])
        h = skip_norm(f, h, layer.final_layer_norm, layer.fc2.bias, f"l{i}.norm3")
    h = node("Reshape", [h, const("hidden_shape", np.array([-1, d], np.int64))], ["hidden"])

    def out(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    if not c.hierarchical:
        logits = node("MatMul", [h, const("head.w", arr(model.token_embed.weight).T)],
                      ["head.mm"])
        logits = node("Add", [logits, const("head.b", arr(model.output_bias)
                                            + arr(model.output_mask))], ["logits"])
        node("LogSoftmax", [logits], ["log_probs"], axis=-1)
        head_outputs = [out("log_probs", ["batch", c.n_tokens])]
    else:
        # the three levels of level_logits in one projection, then split
        top_w = torch.cat([model.token_embed.weight[:c.n_special],
                           model.chapter_embed.weight[:c.n_chapters]], dim=0)
        weights = [arr(top_w), arr(model.category_embed.weight[:c.n_categories]),
                   arr(model.token_embed.weight[c.n_special:])]
        biases = [arr(model.top_bias) + arr(model.output_mask), arr(model.category_bias),
                  arr(model.code_bias)]
        sizes = [w.shape[0] for w in weights]
        logits = node("MatMul", [h, const("head.w", np.concatenate(weights, 0).T)], ["head.mm"])
        logits = node("Add", [logits, const("head.b", np.concatenate(biases))], ["logits"])
        node("Split", [logits, const("head.split", np.array(sizes, np.int64))],
             ["top_logits", "category_logits", "code_logits"], axis=-1)
        node("LogSoftmax", ["top_logits"], ["top_log_probs"], axis=-1)
        axes = const("head.axes", np.array([-1], np.int64))
        for level in ("category", "code"):
            peak = node("ReduceMax", [f"{level}_logits", axes], [f"{level}_max"], keepdims=1)
            shifted = node("Sub", [f"{level}_logits", peak], [f"{level}_shifted"])
            shifted = node("Exp", [shifted], [f"{level}_shifted_exp"])
            node("Transpose", [shifted], [f"{level}_exp"], perm=[1, 0])
        shapes = {"top_log_probs": ["batch", sizes[0]], "category_logits": ["batch", sizes[1]],
                  "category_max": ["batch", 1], "category_exp": [sizes[1], "batch"],
                  "code_logits": ["batch", sizes[2]], "code_max": ["batch", 1],
                  "code_exp": [sizes[2], "batch"]}
        head_outputs = [out(name, shapes[name]) for name in _head_names(model)]

    def inp(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, shape)

    inputs = [inp("decoder_input_ids", TensorProto.INT64, ["batch", 1]),
              inp("position_ids", TensorProto.INT64, [1, 1]),
              inp("encoder_mask32", TensorProto.INT32, ["batch", "encoded"])]
    for i in range(c.decoder_layers):
        inputs += [inp(f"{kind}_{i}", TensorProto.FLOAT,
                       ["batch", heads, "encoded" if kind.startswith("cross") else "past", dh])
                   for kind in ("past_key", "past_value", "cross_key", "cross_value")]
    outputs = head_outputs + [out(name, ["batch", heads, "total", dh]) for name in present]
    graph = helper.make_graph(nodes, "decoder_step", inputs, outputs, initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(ms, 1)],
                              producer_name="synthehr")
    proto.ir_version = 9
    onnx.checker.check_model(proto)
    return proto
