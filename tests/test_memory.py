"""Training memory: the encoded splits are stored compactly (``EncodedExamples``) and give the
same examples and batches as a list of per-visit arrays did; freed heap memory goes back to the
operating system (``training.memory``) during training and evaluation; evaluation scores code
targets in bounded row blocks."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import training.model as model_module
from app.corpus import Patient
from app.vocab import Vocabulary
from training.config import ObjectiveConfig, RunConfig, model_config_for
from training.dataset import (
    EncodedExamples,
    EncodedPatient,
    collate,
    encode_patients,
    encode_windowed,
)
from training.memory import release_heap
from training.model import HierBart

torch.set_num_threads(1)



def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, TypeError, AttributeError):
        return False


GLIBC = _glibc()

CODES = ["4019", "4011", "4280", "42731", "41401", "25000", "25001", "25002", "2724", "5849",
         "5990", "486", "49121", "V5861", "E8497", "2859", "311", "30000", "185", "6000"]


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_heap_returns_freed_tensor_memory():
    # what a training step leaves behind: tensors freed between live ones, which glibc keeps
    # resident once its mmap threshold has grown past their size
    big = torch.empty(24 << 20, dtype=torch.uint8)
    del big  # a freed mmapped 24 MiB block raises glibc's mmap threshold above 1 MiB
    tensors = [torch.ones(1 << 18) for _ in range(320)]  # 1 MiB each, touched
    before = _rss_mib()
    del tensors[::2]  # holes between live tensors: the heap cannot shrink from its top
    held = _rss_mib()
    if before - held > 80:
        pytest.skip("the allocator returned the freed tensors itself (mmapped)")
    assert release_heap() is True
    after = _rss_mib()
    assert held - after > 100, (before, held, after)
    assert release_heap() is True  # harmless when there is nothing to give back
    del tensors


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.from_patients([Patient("all", 50.0, "F", (tuple(CODES),))])


def _model(vocab: Vocabulary) -> HierBart:
    torch.manual_seed(0)
    model = HierBart(model_config_for("tiny", max_positions=64, dropout=0.0), vocab)
    for p in model.parameters():  # away from the near-uniform init: distinct log-probs
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def test_target_log_probs_in_row_blocks_without_autograd(vocab, monkeypatch):
    model = _model(vocab)
    h = torch.randn(300, model.config.d_model)
    target = torch.randint(2, len(vocab), (300,))
    target[target == 5] = 2  # <mask> is never a target
    calls: list[int] = []
    terms = model._code_terms

    def counting(hc, *rest):
        calls.append(hc.shape[0])
        return terms(hc, *rest)

    monkeypatch.setattr(model, "_code_terms", counting)
    with torch.no_grad():
        whole = model.target_log_probs(h, target)  # 32 MiB: one block
        assert len(calls) == 1
        members = model._category_members()[0].shape[1]
        width = max(model.config.n_categories, members * model.config.d_model)
        monkeypatch.setattr(model_module, "TARGET_BLOCK_BYTES", 40 * width * 4)
        calls.clear()
        blocked = model.target_log_probs(h, target)
    n_codes = int((target >= vocab.n_special).sum())
    assert sum(calls) == n_codes and max(calls) <= 40 and len(calls) == -(-n_codes // 40)
    assert torch.allclose(blocked, whole, atol=1e-5)
    full = model.output_log_probs(h).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(blocked, full, atol=1e-4)
    # with autograd the targets are scored in one piece (backward needs what it saved)
    calls.clear()
    h.requires_grad_(True)
    grad = model.target_log_probs(h, target)
    assert len(calls) == 1 and torch.allclose(grad.detach(), whole, atol=1e-6)
    grad.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def _patients(n: int, seed: int = 0) -> list[Patient]:
    rng = np.random.default_rng(seed)
    return [Patient(f"p{i}", float(rng.integers(20, 90)), "MF"[i % 2],
                    tuple(tuple(sorted(set(rng.choice(CODES, size=int(rng.integers(1, 5)),
                                                      replace=False))))
                          for _ in range(int(rng.integers(1, 6)))))
            for i in range(n)]


def test_evaluation_is_the_same_in_row_blocks(vocab, monkeypatch):
    from training.trainer import evaluate

    model = _model(vocab)
    encoded = encode_patients(_patients(40), vocab, 64)
    objective = ObjectiveConfig()
    whole = evaluate(model, encoded, objective, "full", batch_size=16)
    monkeypatch.setattr(model_module, "TARGET_BLOCK_BYTES", 1 << 16)  # a few rows a block
    blocked = evaluate(model, encoded, objective, "full", batch_size=16)
    assert blocked.keys() == whole.keys()
    for key, value in whole.items():
        assert blocked[key] == pytest.approx(value, rel=1e-6), key


def test_trainer_releases_the_heap_during_training_and_evaluation(tmp_path, monkeypatch):
    import training.trainer as trainer_module
    from app.corpus import Corpus

    calls: list[int] = []
    monkeypatch.setattr(trainer_module, "release_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(trainer_module, "TRIM_EVERY_STEPS", 3)
    config = RunConfig(model=model_config_for("tiny", max_positions=64)).override(
        {"train.batch_size": 8, "train.epochs": 1, "train.warmup_steps": 2, "train.threads": 1,
         "train.monitor": "nll_per_token", "train.calibrate": False,
         "train.min_patients_per_code": 1})
    result = trainer_module.train(Corpus("test", _patients(200)), tmp_path / "b", config,
                                  progress=False, log=lambda m: None, export=False)
    steps = result.manifest["metrics"]["schedule"]["steps_per_epoch"]
    assert steps >= 6
    # every third step, and before and after each of the four evaluation passes (validation
    # twice, test twice)
    assert len(calls) == steps // 3 + 4 * 2


# -- compact encodings -------------------------------------------------------------------------
def _long_patients(n: int = 120, seed: int = 1) -> list[Patient]:
    """2-29 visits of 1-4 codes with visit times: many are longer than 32 tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        nv = int(rng.integers(2, 30))
        visits = tuple(tuple(sorted(set(rng.choice(CODES, int(rng.integers(1, 5))).tolist())))
                       for _ in range(nv))
        start = np.concatenate([[0.0], np.cumsum(rng.integers(5, 90, nv - 1))]).astype(float)
        out.append(Patient(f"L{i}", float(rng.integers(60, 80)), "FM"[i % 2], visits,
                           tuple((float(t), float(t) + 1.0) for t in start)))
    return out


def _owned(e: EncodedPatient) -> EncodedPatient:
    """The example as a list of them held it: an owned, writable array per visit."""
    return EncodedPatient(e.age, e.sex, tuple(np.array(v) for v in e.visits),
                          None if e.context is None else tuple(np.array(v) for v in e.context),
                          kept=e.kept, cut=e.cut)


def _same(a: EncodedPatient, b: EncodedPatient) -> bool:
    def arrays(x):
        return None if x is None else [(v.dtype.str, v.tolist()) for v in x]
    return ((a.age, a.sex, a.kept, a.cut, a.n_tokens) == (b.age, b.sex, b.kept, b.cut, b.n_tokens)
            and arrays(a.visits) == arrays(b.visits) and arrays(a.context) == arrays(b.context))


def test_encoded_examples_round_trip_what_was_appended():
    examples = EncodedExamples()
    given = [EncodedPatient(71.5, 1, (np.array([7, 9]), np.array([12]))),
             EncodedPatient(40.0, 0, ()),  # no visit left in the vocabulary
             EncodedPatient(80.25, 0, (np.array([8]),), (np.array([9, 10]),), kept=1, cut=32),
             EncodedPatient(65.0, 1, (np.array([6, 7, 8]),), (), kept=0, cut=0)]
    for e in given:
        examples.append(e.age, e.sex, e.visits, e.context, kept=e.kept, cut=e.cut)
    assert len(examples) == 4
    assert all(_same(a, b) for a, b in zip(examples, given, strict=True))
    assert _same(examples[-1], given[-1]) and _same(examples[np.int64(2)], given[2])
    assert [e.n_tokens for e in examples[1:3]] == [2, 32]
    assert examples.n_tokens.tolist() == [e.n_tokens for e in given]
    assert examples[3].context == () and examples[0].context is None
    with pytest.raises(IndexError):
        examples[4]
    with pytest.raises(ValueError):
        examples[0].visits[0][0] = 1  # views of the shared array: read-only
    with pytest.raises(ValueError):
        examples.append(50.0, 0, ())  # frozen by the first read


@pytest.mark.parametrize("windowed", [True, False])
def test_compact_splits_give_the_batches_a_list_of_arrays_gave(windowed):
    patients = _long_patients()
    vocab = Vocabulary.from_patients(patients)
    if windowed:
        encoded = encode_windowed(patients, vocab, 32).examples
        assert len(encoded) > len(patients)  # windows, with continuation contexts
        assert any(e.context for e in encoded) and any(e.cut for e in encoded)
    else:
        encoded = encode_patients(patients, vocab, 32)
    assert isinstance(encoded, EncodedExamples)
    listed = [_owned(e) for e in encoded]
    assert encoded.n_tokens.tolist() == [e.n_tokens for e in listed]
    for cfg, mode in ((ObjectiveConfig(), "train"), (ObjectiveConfig(), "full"),
                      (ObjectiveConfig(code_order="frequency"), "demographics")):
        rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
        for start in range(0, len(listed), 17):
            a = collate(listed[start:start + 17], rng_a, cfg, mode=mode)
            b = collate(encoded[start:start + 17], rng_b, cfg, mode=mode)
            for name in ("input_ids", "attention_mask", "decoder_input_ids", "labels", "age",
                         "sex"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (mode, name)
    # one flat array of codes and offsets, not an array per visit
    n_codes = sum(len(v) for e in listed for v in (*e.visits, *(e.context or ())))
    n_visits = sum(len(e.visits) + len(e.context or ()) for e in listed)
    assert encoded.nbytes <= 8 * n_codes + 8 * (n_visits + 1) + 48 * len(listed)
