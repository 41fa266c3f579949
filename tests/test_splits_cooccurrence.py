"""Deterministic patient splits, vocabulary and the train co-occurrence matrix."""

from __future__ import annotations

import time
from itertools import combinations
from pathlib import Path

import numpy as np

from app.cooccurrence import build_cooccurrence, load_cooccurrence, save_cooccurrence
from app.corpus import Patient
from app.vocab import SPECIAL_TOKENS, Vocabulary
from training.loaders import load_corpus
from training.splits import split_of, split_patients


def _patients(n: int) -> list[Patient]:
    return [Patient(f"p{i}", 50.0, "F", (("4019",),)) for i in range(n)]


def test_split_is_deterministic_order_free_and_80_10_10() -> None:
    patients = _patients(20_000)
    first = split_patients(patients)
    again = split_patients(list(reversed(patients)))
    assert {p.patient_id for p in first.test} == {p.patient_id for p in again.test}
    sizes = first.sizes()
    assert sum(sizes.values()) == 20_000
    assert abs(sizes["train"] / 20_000 - 0.8) < 0.015
    assert abs(sizes["val"] / 20_000 - 0.1) < 0.01
    assert abs(sizes["test"] / 20_000 - 0.1) < 0.01
    assert split_of("p1") == split_of("p1")
    assert not {p.patient_id for p in first.train} & {p.patient_id for p in first.test}


def test_vocabulary_hierarchy_arrays_and_roundtrip(tmp_path: Path) -> None:
    patients = [Patient("a", 40, "F", (("4019", "25000"), ("V3000", "E8497"))),
                Patient("b", 40, "M", (("4019", "4011"),))]
    vocab = Vocabulary.from_patients(patients)
    assert vocab.tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert vocab.codes == ["25000", "4011", "4019", "E8497", "V3000"]
    assert vocab.categories == ["250", "401", "E849", "V30"]
    assert vocab.counts[vocab.code_id("4019")] == 2
    assert vocab.categories[vocab.code_category[vocab.code_id("4011")]] == "401"
    assert list(vocab.category_chapter) == [2, 6, 18, 17]
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.tokens == vocab.tokens
    assert np.array_equal(loaded.counts, vocab.counts)


def test_cooccurrence_counts_shared_visits_symmetrically(tmp_path: Path) -> None:
    patients = [Patient("a", 40, "F", (("4019", "25000", "4280"), ("4019", "25000"))),
                Patient("b", 60, "M", (("4019", "4280"),))]
    vocab = Vocabulary.from_patients(patients)
    matrix = build_cooccurrence(patients, vocab)
    ids = {c: vocab.code_id(c) for c in vocab.codes}
    dense = matrix.toarray()
    assert dense[ids["4019"], ids["25000"]] == 2
    assert dense[ids["4019"], ids["4280"]] == 2
    assert dense[ids["25000"], ids["4280"]] == 1
    assert (dense == dense.T).all() and not dense.diagonal().any()
    save_cooccurrence(matrix, tmp_path / "c.npz")
    assert (load_cooccurrence(tmp_path / "c.npz", vocab) != matrix).nnz == 0


def test_cooccurrence_on_uci_train_is_fast_and_exact(shared_data: Path) -> None:
    corpus = load_corpus("uci", shared_data / "uci-diabetes-130")
    train = split_patients(corpus.patients).train
    started = time.perf_counter()
    vocab = Vocabulary.from_patients(train)
    matrix = build_cooccurrence(train, vocab)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"co-occurrence of UCI train took {elapsed:.1f}s"
    # Spot-check against a direct count over the visits.
    a, b = "428", "427"
    direct = sum(1 for p in train for v in p.visits if a in v and b in v)
    assert matrix[vocab.code_id(a), vocab.code_id(b)] == direct > 0
    pairs = sum(len(list(combinations(v, 2))) for p in train for v in p.visits)
    assert matrix.sum() == 2 * pairs
