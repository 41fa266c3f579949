"""Generation throughput: our ONNX Runtime engine (fp32, int8) against CTranslate2 (fp32, int8).

    .venv/bin/python bench/generation.py                      # the Performance bar's table
    .venv/bin/python bench/generation.py --threads 1 --batches 1,64
    .venv/bin/python bench/generation.py --extras             # + torch/generate rows, strategies
    .venv/bin/python bench/generation.py --quick              # tiny model, small batches (smoke)

One run, one table, for every thread count in ``--threads`` (default 1 and 2) and batch size in
``--batches`` (default 1, 16, 64, 256). Models: random (untrained) models of the Performance bar's
shape (d 256, 3+3 layers, ``--codes`` 7,000 codes), one **flat** (one softmax over every token,
weights tied to the token embedding) and one **hierarchical** (the service's model), same seed.

What is compared, exactly:

* ``ort fp32`` / ``ort int8``: :class:`app.decoding.engine.Engine` (the service path: grammar,
  validity mask, per-row counter-based sampling, row dropping) over the flat model's exported
  ONNX graphs, fp32 and ONNX Runtime dynamic int8 (:func:`~app.decoding.onnx_model.
  quantize_decoders`). Each patient is decoded for exactly ``--tokens`` decoder positions (``<s>``
  then 47 sampled tokens, the grammar ends every patient at ``max_length``); the encoder reads
  our (empty) prompt plus the demographic prompt vectors.
* ``ct2 fp32`` / ``ct2 int8``: CTranslate2's ``Translator.translate_batch`` on the **same
  weights** (the flat model copied into a ``transformers`` ``BartForConditionalGeneration``:
  token and position embeddings, embedding LayerNorms, layers, tied output projection with the
  output bias and mask as ``final_logits_bias``; converted with ``normalize_before: false``),
  fed 32 random source tokens (it cannot take our demographic prompt vectors), random sampling
  from the full distribution (``sampling_topk=0``), beam 1, exactly 47 generated tokens
  (``min_decoding_length = max_decoding_length``). So both sides decode the same decoder for the
  same number of positions per patient; ours also runs its grammar and masks, CTranslate2 also
  reads 32 source tokens instead of our few.
* ``hier fp32`` / ``hier int8``: the engine over the hierarchical model; ``hier/flat`` is its
  codes per second over the flat model's, same engine, precision and batch (the bar: >= 0.7).

Tokens/s are generated tokens (``<s>`` excluded) per wall second of the whole call, the best of
``--repeat`` measurements whose columns are interleaved; ratios are taken within one thread
count and batch (so background load hits both sides alike).
``--json`` writes the numbers.
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
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--patients", type=int, default=64,
                   help="patients per measurement (at least one batch)")
    p.add_argument("--tokens", type=int, default=48, help="decoder tokens per patient")
    p.add_argument("--codes", type=int, default=7000)
    p.add_argument("--size", default="base", help="model size name (training.config.SIZES)")
    p.add_argument("--strategy-batch", type=int, default=64)
    p.add_argument("--skip", default="",
                   help="comma list of columns to skip (ort_int8, ct2, hier, hier_int8, ...)")
    p.add_argument("--extras", action="store_true",
                   help="also the torch-eager engine, transformers generate and strategy costs")
    p.add_argument("--repeat", type=int, default=2,
                   help="measurements per cell, columns interleaved; the best is kept")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    return p.parse_args()


ARGS = _args()
THREADS = [int(t) for t in str(ARGS.threads).split(",")]
# numpy's BLAS (the GEMM-limit probe) runs on one thread; ONNX Runtime and CTranslate2 take
# their thread counts per session / translator
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np
import torch

from app.decoding import Engine
from app.decoding.onnx_model import OnnxStepModel, quantize_decoders
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


def flat_to_bart(flat: HierBart, out: Path) -> Path:
    """``flat``'s weights in a ``transformers`` BART folder CTranslate2's converter reads."""
    from transformers import BartConfig, BartForConditionalGeneration

    c = flat.config
    assert not c.hierarchical
    config = BartConfig(vocab_size=c.n_tokens, d_model=c.d_model,
                        encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers,
                        encoder_attention_heads=c.attention_heads,
                        decoder_attention_heads=c.attention_heads, encoder_ffn_dim=c.ffn_dim,
                        decoder_ffn_dim=c.ffn_dim, activation_function=c.activation_function,
                        max_position_embeddings=c.max_positions, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, scale_embedding=False,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1, forced_bos_token_id=None,
                        forced_eos_token_id=None, tie_word_embeddings=True)
    bart = BartForConditionalGeneration(config).eval()
    m = bart.model
    with torch.no_grad():
        for emb in (m.shared, m.encoder.embed_tokens, m.decoder.embed_tokens, bart.lm_head):
            emb.weight.copy_(flat.token_embed.weight)
        for pos in (m.encoder.embed_positions, m.decoder.embed_positions):
            offset = pos.weight.shape[0] - c.max_positions  # BART's learned offset (2)
            pos.weight[offset:].copy_(flat.position_embed.weight)
        m.encoder.layernorm_embedding.load_state_dict(flat.encoder_embed_norm.state_dict())
        m.decoder.layernorm_embedding.load_state_dict(flat.decoder_embed_norm.state_dict())
        for ours, theirs in ((flat.encoder_layers, m.encoder.layers),
                             (flat.decoder_layers, m.decoder.layers)):
            for a, b in zip(ours, theirs, strict=True):
                b.load_state_dict(a.state_dict())
        bart.final_logits_bias.copy_((flat.output_bias + flat.output_mask)[None])
    bart.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["normalize_before"] = False  # post-LN BART; CTranslate2's converter reads this key
    (out / "config.json").write_text(json.dumps(cfg))
    # a word-level tokenizer over our token ids (the converter takes the vocabulary from it)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    names = ct2_names(c.n_tokens)
    tok = Tokenizer(WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>",
                            mask_token="<mask>").save_pretrained(out)
    return out


def convert_ct2(bart_dir: Path, out: Path, quantization: str | None) -> Path:
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(bart_dir)).convert(str(out), quantization=quantization, force=True)
    return out


class _NoPrompts(torch.nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model

    def forward(self, features: dict) -> torch.Tensor:
        return torch.zeros(features["age"].shape[0], 0, self.d_model)


def verify_same_weights(flat: HierBart, bart_dir: Path, ct2_dir: Path, vocab_size: int) -> dict:
    """Max |log-prob| gaps: our flat model (its prompts removed) vs the converted BART, and vs
    CTranslate2 fp32 scoring the same tokens: the engines decode the same network."""
    import copy

    import ctranslate2
    from transformers import BartForConditionalGeneration

    ours = copy.deepcopy(flat).eval()
    ours.encoder_prompts = _NoPrompts(ours.config.d_model)
    ours.decoder_prompts = _NoPrompts(ours.config.d_model)
    ours.config = copy.copy(ours.config)
    ours.config.n_prompts_per_feature = 0  # n_prompts = 0: no prompt positions to drop
    bart = BartForConditionalGeneration.from_pretrained(bart_dir).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, vocab_size, (2, 32), generator=gen)
    dec = torch.cat([torch.ones(2, 1, dtype=torch.long),
                     torch.randint(6, vocab_size, (2, 9), generator=gen)], 1)
    age, sex = torch.tensor([40.0, 60.0]), torch.tensor([0, 1])
    with torch.no_grad():
        enc, mask = ours.encode(ids, torch.ones_like(ids), age, sex)
        lp, _ = ours.decode(dec, age, sex, enc, mask)
        theirs = torch.log_softmax(bart(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        decoder_input_ids=dec).logits, -1)
    names = ct2_names(vocab_size)
    scores = ctranslate2.Translator(str(ct2_dir), intra_threads=1).score_batch(
        [[names[i] for i in row] for row in ids.tolist()],
        [[names[i] for i in row[1:]] for row in dec.tolist()])
    mine = lp[:, :-1].gather(-1, dec[:, 1:, None])[..., 0]
    ct2_gap = max(abs(a - b) for r, o in zip(scores, mine.tolist(), strict=True)
                  for a, b in zip(r.log_probs[:9], o, strict=True))
    return {"ours_vs_transformers": float((lp - theirs).abs().max()),
            "ours_vs_ct2_fp32": float(ct2_gap)}


def ct2_names(n_tokens: int) -> list[str]:
    return ["<pad>", "<s>", "</s>", "<unk>", "<v>", "<mask>"] + [
        f"c{i}" for i in range(n_tokens - 6)]


def run_ct2(translator, n_tokens: int, n: int, batch: int, tokens: int,
            warm: bool = True) -> dict:
    rng = np.random.default_rng(0)
    source = [[f"c{i}" for i in rng.integers(0, n_tokens - 6, 32)] for _ in range(batch)]
    length = tokens - 1
    kwargs = {"beam_size": 1, "sampling_topk": 0, "min_decoding_length": length,
              "max_decoding_length": length, "max_batch_size": batch}
    if warm:
        translator.translate_batch(source, **kwargs)  # warm up
    rounds = max(1, n // batch)
    start = time.perf_counter()
    generated = 0
    for _ in range(rounds):
        out = translator.translate_batch(source, **kwargs)
        generated += sum(len(r.hypotheses[0]) for r in out)
    seconds = time.perf_counter() - start
    return {"patients_per_s": rounds * batch / seconds, "tokens_per_s": generated / seconds,
            "seconds": seconds, "mean_tokens": generated / (rounds * batch)}


def run_codes(engine: Engine, n: int, batch: int, warm: bool = True) -> dict:
    """:func:`run_engine` plus code tokens per second."""
    demo = demographics(max(n, batch))
    if warm:
        engine.generate(demo[:batch], "plain", None, seed=99, batch_size=batch)  # warm up
    start = time.perf_counter()
    result = engine.generate(demo, "plain", None, seed=1, batch_size=batch)
    seconds = time.perf_counter() - start
    tokens = sum(len(t) - 1 for t in result.token_ids)
    codes = sum(len(v) for p in result.patients for v in p.visits)
    return {"patients_per_s": len(demo) / seconds, "tokens_per_s": tokens / seconds,
            "codes_per_s": codes / seconds, "seconds": seconds,
            "model_share": result.stats["model_seconds"] / seconds,
            "mean_tokens": tokens / len(demo)}


COLUMNS = ("ort_fp32", "ort_int8", "ct2_fp32", "ct2_int8", "hier_fp32", "hier_int8")


def main() -> None:
    args = ARGS
    batches = [int(b) for b in args.batches.split(",")]
    size, codes, n = args.size, args.codes, args.patients
    if args.quick:
        size, codes, n = "tiny", 500, 16
        batches = [b for b in batches if b <= 16] or [1]
    skip = set(filter(None, args.skip.split(",")))
    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
        skip |= {"ct2_fp32", "ct2_int8"}
        print("ctranslate2 not installed (pip install -e '.[bench]'): no CTranslate2 columns")
    vocab = make_vocab(codes)
    positions = max(64, args.tokens + 8)
    torch.manual_seed(0)
    hier = HierBart(model_config_for(size, max_positions=positions, dropout=0.0), vocab).eval()
    torch.manual_seed(0)
    flat = HierBart(model_config_for(size, max_positions=positions, dropout=0.0,
                                     hierarchical=False), vocab).eval()
    cfg = flat.config
    report: dict = {"threads": THREADS, "size": size, "codes": vocab.n_codes,
                    "tokens": args.tokens, "n_parameters_flat": flat.n_parameters(),
                    "n_parameters_hier": hier.n_parameters(), "table": {}, "gemm": {},
                    "extras": {}}
    limits = engine_limits(args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(flat, tmp / "flat")
        export_onnx(hier, tmp / "hier")
        quantize_decoders(tmp / "flat")
        quantize_decoders(tmp / "hier")
        if ctranslate2 is not None:
            bart = flat_to_bart(flat, tmp / "bart")
            convert_ct2(bart, tmp / "ct2_fp32", None)
            convert_ct2(bart, tmp / "ct2_int8", "int8")
            report["same_weights"] = verify_same_weights(flat, bart, tmp / "ct2_fp32", len(vocab))
            print("same weights, max |log-prob| gap: " + ", ".join(
                f"{k} {v:.1e}" for k, v in report["same_weights"].items()), flush=True)
        for threads in THREADS:
            torch.set_num_threads(threads)
            def engine(name: str, quantize: bool, threads: int = threads) -> Engine:
                return Engine(OnnxStepModel(tmp / name, intra_op_threads=threads,
                                            quantize=quantize), vocab, **limits)
            engines = {"ort_fp32": engine("flat", False), "ort_int8": engine("flat", True),
                       "hier_fp32": engine("hier", False), "hier_int8": engine("hier", True)}
            translators = {}
            if ctranslate2 is not None:
                for q in ("fp32", "int8"):
                    translators[f"ct2_{q}"] = ctranslate2.Translator(
                        str(tmp / f"ct2_{q}"), device="cpu", inter_threads=1,
                        intra_threads=threads)
            for batch in batches:
                count = max(n, batch)
                row: dict = {}
                for rep in range(max(1, args.repeat)):
                    for col in COLUMNS:
                        if col in skip:
                            continue
                        if col.startswith("ct2"):
                            res = run_ct2(translators[col], len(vocab), count, batch,
                                          args.tokens, warm=rep == 0)
                        else:
                            res = run_codes(engines[col], count, batch, warm=rep == 0)
                        if col not in row or res["tokens_per_s"] > row[col]["tokens_per_s"]:
                            row[col] = res
                report["table"][f"{threads}/{batch}"] = row
                print(f"threads {threads} batch {batch}: " + ", ".join(
                    f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in row.items()), flush=True)
            if args.extras and threads == THREADS[0]:
                run_extras(args, report, hier, flat, vocab, cfg, batches, n, skip, limits, tmp)
        for batch in batches:
            report["gemm"][str(batch)] = gemm_limit(cfg, vocab, batch, hierarchical=False)
    print_table(report, batches)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def _ratio(row: dict, a: str, b: str, key: str = "tokens_per_s") -> str:
    if a in row and b in row:
        return f"{row[a][key] / row[b][key]:.2f}"
    return "-"


def print_table(report: dict, batches: list[int]) -> None:
    cols = [c for c in COLUMNS if any(c in r for r in report["table"].values())]
    head = ["threads", "batch", *[f"{c} tok/s" for c in cols], "ort/ct2 fp32", "ort/ct2 int8",
            "hier/flat codes fp32", "hier/flat codes int8"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, row in report["table"].items():
        threads, batch = key.split("/")
        cells = [threads, batch, *[f"{row[c]['tokens_per_s']:,.0f}" if c in row else "-"
                                   for c in cols],
                 _ratio(row, "ort_fp32", "ct2_fp32"), _ratio(row, "ort_int8", "ct2_int8"),
                 _ratio(row, "hier_fp32", "ort_fp32", "codes_per_s"),
                 _ratio(row, "hier_int8", "ort_int8", "codes_per_s")]
        lines.append("| " + " | ".join(cells) + " |")
    gemm = " | ".join(f"b{b}: {report['gemm'][str(b)]['tokens_per_s']:,.0f}" for b in batches
                      if str(b) in report["gemm"])
    print("\n".join(lines))
    print(f"\nfp32 GEMM limit of the flat decoder's step (numpy, 1 thread), tokens/s: {gemm}")


def run_extras(args, report, model, flat, vocab, cfg, batches, n, skip, limits, tmp) -> None:
    """The older rows: torch-eager engine, ``generate``, strategy costs (``--extras``)."""
    ort_engine = Engine(OnnxStepModel(tmp / "hier", intra_op_threads=THREADS[0]), vocab,
                        **limits)
    torch_engine = Engine(TorchStepModel(model), vocab, **limits)
    for batch in batches:
        count = max(n, batch)
        row = {}
        if "torch" not in skip:
            row["torch"] = run_engine(torch_engine, count, batch)
        if "generate" not in skip:
            row["generate"] = run_generate(len(vocab), cfg, count, batch, args.tokens)
        report["extras"][str(batch)] = row
        print(f"extras batch {batch}: " + ", ".join(
            f"{k} {v['patients_per_s']:.1f} patients/s ({v['tokens_per_s']:.0f} tok/s)"
            for k, v in row.items()), flush=True)
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
            report["extras"].setdefault("strategies", {})[strategy] = res
            print(f"strategy {strategy}: {res['patients_per_s']:.1f} patients/s, "
                  f"cost x{res['relative_cost']:.2f} of plain", flush=True)


if __name__ == "__main__":
    main()
