"""Test-split per-code perplexity of trained bundles beside the unigram baseline.

    python -m training.perplexity --source uci --data PATH models/uci-hier models/uci-flat

Per-code perplexity is ``exp(mean over test code occurrences of -log P(code | context))``
with the encoder given only the demographics (how the service generates), teacher-forced on
the test patient with a fixed, seeded code order within visits; structure tokens are scored by
the model but excluded from the mean. The unigram baseline is ``P(code) = visits containing
the code / code occurrences`` in the training split. Test codes outside a bundle's vocabulary
are dropped for every row alike (their count is printed), and so are the later visits of the
few patients longer than the model's ``max_positions`` tokens (the unigram row is scored on the
same codes). Bundles must come from the same
corpus (checked by the manifest's content hash).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = ["bundle_perplexity", "main", "unigram_perplexity"]


def unigram_perplexity(vocab, test_patients) -> tuple[float, int, int]:
    """``(per-code perplexity, scored occurrences, dropped OOV occurrences)``."""
    p = vocab.counts / vocab.counts.sum()
    nll, n, oov = 0.0, 0, 0
    for patient in test_patients:
        for visit in patient.visits:
            for code in visit:
                if code in vocab.index:
                    nll -= math.log(p[vocab.code_id(code)])
                    n += 1
                else:
                    oov += 1
    return math.exp(nll / max(n, 1)), n, oov


def bundle_perplexity(bundle_dir: str | Path, test_patients, threads: int = 2,
                      mode: str = "demographics") -> dict[str, float]:
    import torch

    from training.config import ObjectiveConfig
    from training.dataset import encode_patients
    from training.model import HierBart
    from training.trainer import evaluate

    torch.set_num_threads(threads)
    model = HierBart.from_bundle(bundle_dir)
    from app.vocab import Vocabulary

    vocab = Vocabulary.load(Path(bundle_dir) / "vocab.json")
    enc = encode_patients(test_patients, vocab, model.config.max_positions)
    return evaluate(model, enc, ObjectiveConfig(), mode=mode, batch_size=512)


def main(argv: list[str] | None = None) -> None:
    from app.bundle import read_manifest
    from app.corpus import Patient
    from app.vocab import Vocabulary
    from training.bundle import corpus_hash
    from training.loaders import load_corpus
    from training.splits import split_patients

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--source", help="data source (else the preset)")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--preset", help="simulated corpus preset instead of --source/--data")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.preset:
        from training.simulate import simulate_corpus
        corpus = simulate_corpus(args.preset, 0).corpus
    else:
        corpus = load_corpus(args.source, args.data)
    digest = corpus_hash(corpus.patients)
    test = split_patients(corpus.patients).test
    rows = []
    first_vocab = None
    for bundle in args.bundles:
        manifest = read_manifest(bundle)
        if manifest["data"]["content_hash"] != digest:
            raise SystemExit(f"{bundle} was trained on different data than {args.data}")
        vocab = Vocabulary.load(bundle / "vocab.json")
        first_vocab = first_vocab or vocab
        result = bundle_perplexity(bundle, test, args.threads)
        m = manifest["metrics"]
        kind = "hierarchical" if manifest["model"]["hierarchical"] else "flat"
        rows.append(((f"{bundle.name} ({kind}, {manifest['n_parameters']:,} params, "
                      f"{m['epochs_run']} epochs, best {m['best_epoch']})"),
                     result["ppl_code"], result["n_codes"],
                     f"{m['wall_seconds'] / 60:.1f} min"))
    # score the unigram baseline on exactly the codes the models saw (same max_positions cut)
    from training.dataset import encode_patients

    max_len = read_manifest(args.bundles[0])["model"]["max_positions"]
    kept = [Patient(f"t{i}", e.age, "F", tuple(tuple(first_vocab.tokens[t] for t in v)
                                                for v in e.visits))
            for i, e in enumerate(encode_patients(test, first_vocab, max_len))]
    _, _, oov = unigram_perplexity(first_vocab, test)
    uni, n, _ = unigram_perplexity(first_vocab, kept)
    rows.append(("unigram baseline (train code frequencies)", uni, n, "-"))
    print(f"test split: {len(test):,} patients; {oov} code occurrences outside the vocabulary "
          f"dropped")
    print("| model | test per-code perplexity | scored codes | training wall time |")
    print("| --- | --- | --- | --- |")
    for name, ppl, count, wall in rows:
        print(f"| {name} | {ppl:.2f} | {count:,} | {wall} |")


if __name__ == "__main__":
    main()
