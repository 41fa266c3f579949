"""What small-cell suppression removes: codes before/after ``k`` on each corpus's train split.

    python bench/small_cells.py [--k 11]

Prints one markdown row per corpus found (UCI, eICU demo and MIMIC-III demo in
``../shared/data``, and the simulated demo preset): train patients, codes before and after,
and the share of code occurrences (code-visit pairs) kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from app.vocab import Vocabulary
from training.cli.train import load_training_corpus
from training.splits import split_patients

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = [("uci", DATA / "uci-diabetes-130", None), (None, None, "demo"),
           ("eicu", DATA / "eicu-demo", None), ("mimic3", DATA / "mimic3-demo", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=11)
    k = parser.parse_args().k
    print("| corpus | train patients | codes before -> after | code occurrences kept |")
    print("| --- | ---: | ---: | ---: |")
    for source, path, preset in CORPORA:
        if path is not None and not path.exists():
            continue
        corpus = load_training_corpus(source, path, preset)
        train = split_patients(corpus.patients).train
        full = Vocabulary.from_patients(train)
        kept = Vocabulary.from_patients(train, min_patients=k)
        total = int(full.counts.sum())
        share = sum(int(n) for c, n in zip(full.codes, full.counts, strict=True)
                    if c in kept.index) / max(total, 1)
        print(f"| {corpus.source} | {len(train):,} | {full.n_codes:,} -> {kept.n_codes:,} | "
              f"{share:.1%} |")


if __name__ == "__main__":
    main()
