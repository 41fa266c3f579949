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
    every later step: ``decoder_input_ids [B, T], encoder_mask, past_key_i, past_value_i,
    cross_key_i, cross_value_i`` -> the head's outputs, ``present_key_i, present_value_i``.

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

__all__ = ["GRAPHS", "OPSET", "export_onnx"]

OPSET = 18


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
                quantize: bool = False) -> list[str]:
    """Write :data:`GRAPHS` into ``bundle_dir`` (registered in its manifest if it has one).

    ``quantize``: also write the dynamic int8 decoders (:data:`INT8_GRAPHS`, see
    :func:`~app.decoding.onnx_model.quantize_decoders`); without it, stale ones are removed.
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
        _export(_DecoderStep(model), (dec_ids, enc_mask, *past_flat),
                bundle_dir / "decoder.onnx", ["decoder_input_ids", "encoder_mask", *past_names],
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
