"""Fidelity of the int8 (ONNX Runtime dynamic quantization) decoders against fp32.

    .venv/bin/python bench/int8_fidelity.py BUNDLE [--preset demo] [--repeat 5]

Loads a trained bundle (exporting its ONNX graphs, int8 included, where they are missing),
regenerates the bundle's corpus (the simulated ``--preset`` with seed 0, as ``synthehr train
--preset`` does) to get its test split, and generates one patient per test patient (same age and
sex; ``--repeat`` times over, to shrink sampling noise) with the fp32 and the int8 engine, plain
decoding, the same seeds. Prints bigram/unigram R2 and JSD of each against the test split, and,
as the noise floor, the same metrics for fp32 with another seed. The bar: |int8 - fp32| bigram R2
within 0.01.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--preset", default="demo")
    p.add_argument("--repeat", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from app.bundle import load_bundle
    from app.decoding import Engine
    from app.decoding.onnx_model import GRAPHS, INT8_GRAPHS
    from app.evaluation.fidelity import bigram_r2, code_jsd, unigram_r2
    from training.simulate import simulate_corpus
    from training.splits import split_patients

    if not all((args.bundle / g).is_file() for g in (*GRAPHS, *INT8_GRAPHS.values())):
        from training.export import export_onnx
        from training.model import HierBart

        export_onnx(HierBart.from_bundle(args.bundle), args.bundle, quantize=True)
    bundle = load_bundle(args.bundle)
    test = split_patients(simulate_corpus(args.preset, seed=0).corpus.patients).test
    demo = [(p.age, p.sex) for p in test] * args.repeat
    rows = {}
    for name, quantize, seed in (("fp32", False, 1), ("int8", True, 1), ("fp32 seed 2", False, 2)):
        engine = Engine.from_bundle(bundle, intra_op_threads=args.threads, quantize=quantize)
        out = engine.generate(demo, "plain", None, seed=seed).patients
        rows[name] = {"bigram_r2": bigram_r2(test, out), "unigram_r2": unigram_r2(test, out),
                      "jsd": code_jsd(test, out)}
    print(f"test patients {len(test)}, generated {len(demo)} per engine")
    print("| engine | bigram R2 | unigram R2 | JSD |\n| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['bigram_r2']:.4f} | {r['unigram_r2']:.4f} | {r['jsd']:.4f} |")
    gap = abs(rows["int8"]["bigram_r2"] - rows["fp32"]["bigram_r2"])
    noise = abs(rows["fp32 seed 2"]["bigram_r2"] - rows["fp32"]["bigram_r2"])
    print(f"|int8 - fp32| bigram R2 = {gap:.4f} (bar 0.01); fp32 seed-to-seed: {noise:.4f}")


if __name__ == "__main__":
    main()
