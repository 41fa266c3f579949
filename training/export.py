"""Export a trained :class:`~training.model.HierBart` to the ONNX graphs the service runs.

Three graphs, exported with ``torch.onnx.export`` directly (TorchScript exporter, opset 18,
dynamic batch / sequence / cache axes; the hierarchical heads are inside the graphs, so each
decoder graph outputs flat log-probabilities over every token id):

``encoder.onnx``
    ``input_ids [B, S] int64, attention_mask [B, S] int64, age [B] float32, sex [B] int64``
    -> ``encoder_hidden [B, E, d], encoder_mask [B, E] int64`` (``E = S`` + prompt positions).
``decoder_init.onnx``
    the first decoder call (it prepends the demographic prompts): ``decoder_input_ids [B, T],
    age, sex, encoder_hidden, encoder_mask`` -> ``log_probs [B, V]`` (next token after the last
    input), ``present_key_i, present_value_i [B, H, P + T, dh]`` (self-attention cache) and
    ``cross_key_i, cross_value_i [B, H, E, dh]`` for each decoder layer ``i``.
``decoder.onnx``
    every later step: ``decoder_input_ids [B, T], encoder_mask, past_key_i, past_value_i,
    cross_key_i, cross_value_i`` -> ``log_probs [B, V], present_key_i, present_value_i``.

:func:`export_onnx` writes them into a bundle folder and registers their checksums in its
manifest (where there is one); :mod:`app.decoding.onnx_model` runs them without torch.
Extra demographic features (:attr:`ModelConfig.extra_features`) are not exported yet.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from app.decoding.onnx_model import GRAPHS
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
        log_probs = self.model.output_log_probs(h[:, -1])
        flat = [t for layer in past for t in layer]
        return (log_probs, *flat)


class _DecoderStep(nn.Module):
    def __init__(self, model: HierBart) -> None:
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_mask, *past_flat):
        past = tuple(tuple(past_flat[4 * i: 4 * i + 4]) for i in range(len(past_flat) // 4))
        h, new_past = self.model.decoder_hidden(decoder_input_ids, None, None, None,
                                                encoder_mask, past)
        log_probs = self.model.output_log_probs(h[:, -1])
        return (log_probs, *[t for layer in new_past for t in layer[:2]])


def _layer_names(n_layers: int, kinds: tuple[str, ...]) -> list[str]:
    return [f"{kind}_{i}" for i in range(n_layers) for kind in kinds]


def export_onnx(model: HierBart, bundle_dir: str | Path, opset: int = OPSET) -> list[str]:
    """Write :data:`GRAPHS` into ``bundle_dir`` (registered in its manifest if it has one).

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
                "encoder_mask": {0: "batch", 1: "encoded"}, "log_probs": {0: "batch"}}
        for name in present:
            axes[name] = {0: "batch", 2: "encoded" if name.startswith("cross") else "total"}
        _export(_DecoderInit(model), (dec_ids, age, sex, enc_h, enc_mask),
                bundle_dir / "decoder_init.onnx",
                ["decoder_input_ids", "age", "sex", "encoder_hidden", "encoder_mask"],
                ["log_probs", *present], axes, opset)
        written.append("decoder_init.onnx")

        _, past = model.decoder_hidden(torch.ones(batch, steps, dtype=torch.long), age, sex,
                                       enc_h, enc_mask, None)
        past_flat = [t for layer in past for t in layer]
        past_names = _layer_names(n_layers, ("past_key", "past_value", "cross_key",
                                             "cross_value"))
        out_names = _layer_names(n_layers, ("present_key", "present_value"))
        axes = {"decoder_input_ids": {0: "batch", 1: "new"},
                "encoder_mask": {0: "batch", 1: "encoded"}, "log_probs": {0: "batch"}}
        for name in past_names:
            axes[name] = {0: "batch", 2: "encoded" if name.startswith("cross") else "past"}
        for name in out_names:
            axes[name] = {0: "batch", 2: "total"}
        _export(_DecoderStep(model), (dec_ids, enc_mask, *past_flat),
                bundle_dir / "decoder.onnx", ["decoder_input_ids", "encoder_mask", *past_names],
                ["log_probs", *out_names], axes, opset)
        written.append("decoder.onnx")
    model.train(was_training)
    if (bundle_dir / "manifest.json").is_file():
        from training.bundle import add_bundle_file

        for name in written:
            add_bundle_file(bundle_dir, name)
    return written


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict, opset: int) -> None:
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=axes, opset_version=opset, dynamo=False,
                      do_constant_folding=True)
