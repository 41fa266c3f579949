"""Generation throughput: the ONNX Runtime engine against a torch eager loop and ``generate``.

    .venv/bin/python bench/generation.py                  # base size, batches 1/32/256, 1 thread
    .venv/bin/python bench/generation.py --threads 2 --batches 1,64
    .venv/bin/python bench/generation.py --quick          # tiny model, small batches (smoke run)

A random (untrained) model of the Performance bar's shape (d 256, 3+3 layers, ~7,000 codes,
hierarchical heads) decodes patients of a fixed token budget (``--tokens``, ``<s>`` to ``</s>``)
conditioned on age and sex, on

* ``ort``: :class:`app.decoding.engine.Engine` over the exported ONNX graphs (the service path),
* ``ort_flat``: the same on a flat-softmax model of the same size (the hierarchy's cost),
* ``torch``: the same engine (same grammar, masks, sampling) over torch eager steps,
* ``generate``: ``transformers``' ``BartForConditionalGeneration.generate`` (sampling, a flat
  BART of the same size, 32 prompt tokens, no grammar),
* ``ctranslate2`` fp32/int8 on that flat BART, where the package is installed.

It reports patients/s and generated tokens/s per batch size; each strategy's cost relative to
``plain`` (ort, ``--strategy-batch``); the single-thread fp32 GEMM rate on the decoder's own
matmul shapes (numpy), the tokens/s those GEMMs alone would allow, and the engine's share of
the loop (time inside ONNX Runtime / total). One run, as the Performance bar specifies; write
``--json`` for the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--patients", type=int, default=256,
                   help="patients per measurement (at least one batch)")
    p.add_argument("--tokens", type=int, default=48, help="decoder tokens per patient")
    p.add_argument("--codes", type=int, default=7000)
    p.add_argument("--size", default="base", help="model size name (training.config.SIZES)")
    p.add_argument("--strategy-batch", type=int, default=64)
    p.add_argument("--skip", default="", help="comma list of engines to skip")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    return p.parse_args()


ARGS = _args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np
import torch

from app.decoding import Engine
from app.decoding.onnx_model import OnnxStepModel
from app.icd9.codes import category_of
from app.icd9.hierarchy import load_hierarchy
from app.vocab import Vocabulary
from training.config import model_config_for
from training.export import export_onnx
from training.model import HierBart
from training.torch_step import TorchStepModel


def make_vocab(n_codes: int) -> Vocabulary:
    billable = load_hierarchy().billable_codes
    step = max(1, len(billable) // n_codes)
    codes = sorted(billable[::step][:n_codes])
    return Vocabulary(codes, np.ones(len(codes), dtype=np.int64),
                      sorted({category_of(c) for c in codes}))


def demographics(n: int) -> list[tuple[float, str]]:
    rng = np.random.default_rng(0)
    return [(float(a), str(s)) for a, s in zip(rng.integers(18, 90, n),
                                                 rng.choice(["F", "M"], n), strict=True)]


def engine_limits(tokens: int) -> dict:
    # Visits of up to 10 codes; the token budget ends every patient at ``tokens``.
    return {"max_visits": 50, "max_codes_per_visit": 10, "max_length": tokens}


def run_engine(engine: Engine, n: int, batch: int, strategy: str = "plain",
               params: dict | None = None) -> dict:
    demo = demographics(max(n, batch))
    engine.generate(demo[:batch], strategy, params, seed=99, batch_size=batch)  # warm up
    start = time.perf_counter()
    result = engine.generate(demo, strategy, params, seed=1, batch_size=batch)
    seconds = time.perf_counter() - start
    tokens = sum(len(t) - 1 for t in result.token_ids)
    return {"patients_per_s": len(demo) / seconds, "tokens_per_s": tokens / seconds,
            "seconds": seconds, "model_share": result.stats["model_seconds"] / seconds,
            "mean_tokens": tokens / len(demo)}


def run_generate(vocab_size: int, cfg, n: int, batch: int, tokens: int) -> dict:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=vocab_size, d_model=cfg.d_model,
                        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
                        encoder_attention_heads=cfg.attention_heads,
                        decoder_attention_heads=cfg.attention_heads,
                        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
                        max_position_embeddings=max(64, tokens + 8), pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        forced_bos_token_id=None)
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    ids = torch.randint(6, vocab_size, (batch, 32))
    kwargs = {"max_new_tokens": tokens - 1, "min_new_tokens": tokens - 1, "do_sample": True,
              "top_k": 0, "num_beams": 1}
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        rounds = max(1, n // batch)
        start = time.perf_counter()
        for _ in range(rounds):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        seconds = time.perf_counter() - start
    patients = rounds * batch
    return {"patients_per_s": patients / seconds,
            "tokens_per_s": patients * (tokens - 1) / seconds, "seconds": seconds}


def gemm_limit(cfg, vocab: Vocabulary, batch: int, hierarchical: bool = True) -> dict:
    """Single-thread fp32 GEMM time of one decoder step's matmuls (numpy), and its rate."""
    d, f, layers = cfg.d_model, cfg.ffn_dim, cfg.decoder_layers
    heads_out = len(vocab) + (vocab.n_categories + vocab.n_chapters if hierarchical else 0)
    shapes = [(d, d)] * 6 * layers + [(d, f), (f, d)] * layers + [(d, heads_out)]
    rng = np.random.default_rng(0)
    total, flops = 0.0, 0.0
    for k, m in sorted(set(shapes)):
        a = rng.standard_normal((batch, k), dtype=np.float32)
        b = rng.standard_normal((k, m), dtype=np.float32)
        reps = max(3, int(2e8 / (2 * batch * k * m)))
        a @ b
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        per = (time.perf_counter() - start) / reps
        count = shapes.count((k, m))
        total += per * count
        flops += 2.0 * batch * k * m * count
    return {"step_seconds": total, "tokens_per_s": batch / total, "gflops": flops / total / 1e9,
            "flops_per_token": flops / batch}


def main() -> None:
    args = ARGS
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    size, codes, n = args.size, args.codes, args.patients
    if args.quick:
        size, codes, n = "tiny", 500, 32
        batches = [b for b in batches if b <= 32] or [1]
    skip = set(filter(None, args.skip.split(",")))
    vocab = make_vocab(codes)
    torch.manual_seed(0)
    cfg = model_config_for(size, max_positions=max(64, args.tokens + 8), dropout=0.0)
    model = HierBart(cfg, vocab).eval()
    report: dict = {"threads": args.threads, "size": size, "codes": vocab.n_codes,
                    "tokens": args.tokens, "n_parameters": model.n_parameters(),
                    "engines": {}, "strategies": {}, "gemm": {}}
    limits = engine_limits(args.tokens)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tmp_flat:
        export_onnx(model, tmp)
        ort_engine = Engine(OnnxStepModel(tmp, intra_op_threads=args.threads), vocab, **limits)
        torch.manual_seed(0)
        flat = HierBart(model_config_for(size, max_positions=max(64, args.tokens + 8),
                                         dropout=0.0, hierarchical=False), vocab).eval()
        export_onnx(flat, tmp_flat)
        flat_engine = Engine(OnnxStepModel(tmp_flat, intra_op_threads=args.threads), vocab,
                             **limits)
        torch_engine = Engine(TorchStepModel(model), vocab, **limits)
        for batch in batches:
            count = max(n, batch)
            row = {}
            if "ort" not in skip:
                row["ort"] = run_engine(ort_engine, count, batch)
            if "ort_flat" not in skip:
                row["ort_flat"] = run_engine(flat_engine, count, batch)
            if "torch" not in skip:
                row["torch"] = run_engine(torch_engine, count, batch)
            if "generate" not in skip:
                row["generate"] = run_generate(len(vocab), cfg, count, batch, args.tokens)
            report["engines"][str(batch)] = row
            report["gemm"][str(batch)] = gemm_limit(cfg, vocab, batch)
            print(f"batch {batch}: " + ", ".join(
                f"{k} {v['patients_per_s']:.1f} patients/s ({v['tokens_per_s']:.0f} tok/s)"
                for k, v in row.items()) + f"; GEMM limit {report['gemm'][str(batch)]['tokens_per_s']:.0f} tok/s",
                flush=True)
        if "strategies" not in skip:
            sb = args.strategy_batch if not args.quick else 16
            base = run_engine(ort_engine, max(n, sb), sb)
            for strategy, params in [("plain", None), ("cooccurrence", {"alpha": 1.0}),
                                     ("rerank", {"candidates": 4, "coherence_weight": 0.0}),
                                     ("retrieve_edit", None)]:
                if strategy == "plain":
                    res = base
                elif strategy == "cooccurrence":
                    import scipy.sparse as sp
                    rng = np.random.default_rng(0)
                    nnz = vocab.n_codes * 50
                    r, c = rng.integers(0, vocab.n_codes, nnz), rng.integers(0, vocab.n_codes, nnz)
                    mat = sp.csr_matrix((np.ones(nnz, np.int32), (r, c)),
                                        shape=(vocab.n_codes, vocab.n_codes))
                    from app.decoding import CooccurrenceStats
                    ort_engine.cooccurrence = CooccurrenceStats.from_vocab(mat + mat.T, vocab,
                                                                           100_000)
                    res = run_engine(ort_engine, max(n, sb), sb, strategy, params)
                elif strategy == "rerank":
                    res = run_engine(ort_engine, max(n, sb) // 4, sb, strategy, params)
                else:
                    from app.corpus import Patient
                    from app.decoding import RetrievalIndex
                    rng = np.random.default_rng(1)
                    train = [Patient(f"t{i}", float(rng.integers(18, 90)), "FM"[i % 2],
                                     (tuple(rng.choice(vocab.codes, 8, replace=False)),))
                             for i in range(5000)]
                    ort_engine.retrieval = RetrievalIndex.from_patients(train, vocab)
                    res = run_engine(ort_engine, max(n, sb), sb, strategy, params)
                res["relative_cost"] = base["patients_per_s"] / res["patients_per_s"]
                report["strategies"][strategy] = res
                print(f"strategy {strategy}: {res['patients_per_s']:.1f} patients/s, "
                      f"cost x{res['relative_cost']:.2f} of plain", flush=True)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
