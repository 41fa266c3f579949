"""Long patients (``app.windows``): windowed training keeps every visit, continuation prompts
are right, a trained ONNX bundle rolls patients over windows, and bundles without the rule
decode exactly as before."""

from __future__ import annotations

import hashlib
import json
import shutil
from itertools import pairwise

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from typer.testing import CliRunner

from app.cli import app
from app.cooccurrence import build_cooccurrence
from app.corpus import Corpus, Patient, length_stats, token_length
from app.decoding import Engine
from app.decoding.grammar import END_VISIT_ID, EOS_ID, N_SPECIAL, VISIT_ID
from app.decoding.model_api import RandomStepModel
from app.decoding.retrieval import RetrievalIndex
from app.decoding.strategies import CooccurrenceStats
from app.vocab import Vocabulary
from app.windows import MANIFEST_KEY, WindowRule, continuation_prompt, window_bounds
from training.config import ObjectiveConfig, RunConfig, model_config_for
from training.dataset import TOKENS, collate, encode_patients, encode_windowed

CODES = ["4019", "25000", "4280", "42731", "5849", "2724", "41401", "486", "V5869", "7804",
         "78650", "2720"]
L = 32  # a small max_positions: about a third of these patients are longer


def long_history(n: int = 240, seed: int = 0) -> list[Patient]:
    """Claims-like patients: 2-29 visits of 1-3 codes, a visit every 5-90 days."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        nv = int(rng.integers(2, 30))
        visits = tuple(tuple(sorted(set(rng.choice(CODES, int(rng.integers(1, 4))).tolist())))
                       for _ in range(nv))
        start = np.concatenate([[0.0], np.cumsum(rng.integers(5, 90, nv - 1))]).astype(float)
        times = tuple((float(s), float(s) + 1.0) for s in start)
        out.append(Patient(f"P{i:04d}", float(rng.integers(60, 80)), "FM"[i % 2], visits, times))
    return out


@pytest.fixture(scope="module")
def patients() -> list[Patient]:
    return long_history()


@pytest.fixture(scope="module")
def vocab(patients) -> Vocabulary:
    return Vocabulary.from_patients(patients)


# -- the window rule ------------------------------------------------------------------------

def test_window_bounds_keep_each_visit_once() -> None:
    assert window_bounds([3] * 5, 40) == [window_bounds([3] * 5, 40)[0]]  # fits: one window
    for sizes in ([3] * 12, [1, 16, 2, 2, 9, 1, 1, 1, 5], [28] * 3):
        windows = window_bounds(sizes, L)
        assert windows[0].start == 0 and windows[-1].final
        assert all(not w.final for w in windows[:-1])
        for a, b in pairwise(windows):
            assert b.start == a.kept > a.start  # the next window starts at the first not kept
            assert a.stop > a.kept  # the cut visit is carried (seen cut) at the end
    with pytest.raises(ValueError):
        window_bounds([29], L)  # more than L - 4 codes cannot fit a window


def test_every_visit_reaches_a_training_window(patients, vocab) -> None:
    encoded = encode_windowed(patients, vocab, L)
    assert encoded.counts["patients_windowed"] == sum(token_length(p) > L for p in patients) > 50
    assert encoded.counts["visits_kept"] == encoded.counts["visits_total"] \
        == sum(len(p.visits) for p in patients)
    for p in patients:
        examples = encode_windowed([p], vocab, L).examples
        kept = [v.tolist() for e in examples
                for v in (e.visits if e.kept < 0 else e.visits[:e.kept])]
        assert kept == [sorted(vocab.index[c] for c in v) for v in p.visits]
        assert all(e.n_tokens <= L for e in examples)
        if token_length(p) <= L:
            assert len(examples) == 1 and examples[0].context is None


def test_window_prompts_ages_and_end_token(patients, vocab) -> None:
    rng = np.random.default_rng(0)
    rule = WindowRule(L)
    n_continuations = 0
    for p in [p for p in patients if token_length(p) > L][:30]:
        examples = encode_windowed([p], vocab, L).examples
        batch = collate(examples, rng, ObjectiveConfig(), mode="demographics")
        first_visit = 0
        for i, e in enumerate(examples):
            target = [TOKENS.bos, *[t for t in batch.labels[i].tolist() if t != TOKENS.pad]]
            final = i == len(examples) - 1
            # the end-of-patient token only in the window that holds the real end
            assert (TOKENS.eos in target) == final
            assert len(target) == (e.n_tokens if final else L)
            source = [t for t in batch.input_ids[i].tolist() if t != TOKENS.pad]
            if i == 0:
                assert source == [TOKENS.bos, TOKENS.eos] and e.age == p.age
            else:
                n_continuations += 1
                # continuation marker, then the visits just before the window
                assert source[:2] == [TOKENS.bos, TOKENS.mask] and len(source) <= \
                    rule.context_tokens
                before = [sorted(vocab.index[c] for c in v) for v in p.visits[:first_visit]]
                shown = _visits(source[2:])
                assert [sorted(v) for v in shown] == before[-len(shown):] and shown
                # the age at the window's first visit, from the visit times
                expected = p.age + p.visit_times[first_visit][0] / 365.25
                assert e.age == pytest.approx(min(expected, 90.0))
                assert float(batch.age[i]) == pytest.approx(e.age)
            first_visit += e.kept
    assert n_continuations > 30


def test_patients_that_fit_are_encoded_as_before(patients, vocab) -> None:
    short = [p for p in patients if token_length(p) <= L]
    old = encode_patients(short, vocab, L)
    new = encode_windowed(short, vocab, L).examples
    assert len(old) == len(new)
    for a, b in zip(old, new, strict=True):
        assert (a.age, a.sex) == (b.age, b.sex)
        assert [v.tolist() for v in a.visits] == [v.tolist() for v in b.visits]
    cfg = ObjectiveConfig(demographics_only_prob=0.5)
    x = collate(old, np.random.default_rng(3), cfg)
    y = collate(new, np.random.default_rng(3), cfg)
    for name in ("input_ids", "attention_mask", "decoder_input_ids", "labels", "age", "sex"):
        assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_truncate_rule_is_recorded(patients, vocab) -> None:
    from training.trainer import _encode_splits

    messages: list[str] = []
    (train, _, _), info = _encode_splits((patients, patients[:5], patients[:5]), vocab, L,
                                         None, "truncate", False, messages.append)
    assert info["rule"] == "truncate" and WindowRule.from_manifest({MANIFEST_KEY: info}) is None
    assert info["train"]["patients_cut"] > 50 and "earliest visits" in messages[0]
    assert len(train) == len(patients)
    (_, _, _), dp = _encode_splits((patients, patients, patients), vocab, L, None, "windows",
                                   True, messages.append)
    assert dp["rule"] == "truncate" and "differential privacy" in dp["reason"]
    assert "train" not in dp  # no exact count of long training patients under DP


# -- data stats -----------------------------------------------------------------------------

def test_length_stats_and_data_stats_report_the_long_patients(patients, tmp_path) -> None:
    stats = length_stats(patients, L)
    over = [p for p in patients if token_length(p) > L]
    assert stats.over_limit == len(over) and not stats.recipe_positions
    assert stats.windows_over_limit == sum(
        len(window_bounds([len(v) for v in p.visits], L)) for p in over)
    assert "p99.9" in stats.token_percentiles and "p99.9" in stats.visit_percentiles
    recipe = length_stats(patients)
    assert recipe.recipe_positions and recipe.max_positions % 32 == 0
    assert recipe.max_positions >= recipe.token_percentiles["p99"]

    from training.simulate import write_generic

    path = tmp_path / "claims.csv"
    write_generic(Corpus("long", patients), path)
    result = CliRunner().invoke(app, ["data", "stats", "--source", "generic", str(path)])
    assert result.exit_code == 0, result.output
    assert "the recipe's" in result.output and "windows they train on" in result.output
    assert "patient length in tokens, p99.9" in result.output
    result = CliRunner().invoke(app, ["data", "stats", "--source", "generic", str(path),
                                      "--max-positions", str(L)])
    assert f"patients longer than {L} tokens" in result.output
    assert f"{stats.windows_over_limit:,}" in result.output


# -- a trained bundle generates long patients over windows ------------------------------------

def _visits(tokens: list[int]) -> list[list[int]]:
    """The code token ids of each ``<v> ... </v>`` in ``tokens``."""
    out, current = [], None
    for t in tokens:
        if t == VISIT_ID:
            current = []
        elif t == END_VISIT_ID and current is not None:
            out.append(current)
            current = None
        elif current is not None:
            current.append(t)
    return out


def _assert_well_formed(tokens: list[int], max_visits: int, max_codes: int) -> int:
    assert tokens[0] == TOKENS.bos and tokens[-1] == EOS_ID and tokens.count(EOS_ID) == 1
    visits = _visits(tokens)
    assert tokens[1:-1].count(VISIT_ID) == tokens[1:-1].count(END_VISIT_ID) == len(visits)
    assert 1 <= len(visits) <= max_visits
    for v in visits:
        assert 1 <= len(v) <= max_codes and len(set(v)) == len(v)
        assert all(t >= N_SPECIAL for t in v)
    return len(visits)


@pytest.fixture(scope="module")
def long_bundle(patients, tmp_path_factory):
    from training.trainer import train

    messages: list[str] = []
    run = RunConfig(model=model_config_for("tiny", max_positions=L, dropout=0.0)).override({
        "train.batch_size": 32, "train.epochs": 4, "train.warmup_steps": 5,
        "train.threads": 1, "train.monitor": "nll_per_token", "train.calibrate": False,
        "train.min_patients_per_code": 1, "train.lr": 5e-3})
    out = tmp_path_factory.mktemp("long") / "bundle"
    result = train(Corpus("long-history", patients), out, run, progress=False,
                   log=messages.append, export=True)
    return result, messages


def test_training_logs_and_records_the_windows(long_bundle) -> None:
    result, messages = long_bundle
    info = result.manifest[MANIFEST_KEY]
    train = info["train"]
    assert info["rule"] == "windows" and info["max_positions"] == L
    assert train["patients_windowed"] > 0 and train["continuation_windows"] > 0
    assert train["visits_kept"] == train["visits_total"] and train["codes_cut"] == 0
    assert 0.05 < info["years_per_visit"] < 0.25  # a visit every 5-90 days
    assert any("windows of consecutive visits" in m and "visits kept" in m for m in messages)


def test_onnx_engine_generates_patients_longer_than_a_window(long_bundle) -> None:
    from app.bundle import load_bundle
    from training.torch_step import TorchStepModel

    result, _ = long_bundle
    bundle = load_bundle(result.bundle_dir)
    engine = Engine.from_bundle(bundle, intra_op_threads=1, batch_size=16)
    assert engine.windows is not None and engine.max_length == L
    assert engine.max_visits >= 25  # the training split's longest patient, not one window
    demo = [(70.0, "F"), (65.0, "M"), (75.0, "F")] * 12
    out = engine.generate(demo, "plain", seed=4)
    n_visits = [_assert_well_formed(t, engine.max_visits, engine.max_codes_per_visit)
                for t in out.token_ids]
    lengths = [len(t) for t in out.token_ids]
    assert max(lengths) > L and sum(n > L for n in lengths) >= 3  # rolled over windows
    assert max(n_visits) > (L - 2) // 3  # more visits than one window holds
    assert out.to_json() == engine.generate(demo, "plain", seed=4).to_json()
    # required codes survive rolling, and the torch model gives the same patients
    forced = engine.generate(demo[:12], "plain", seed=5, must_include=["486"])
    assert all(any("486" in v for v in p.visits) for p in forced.patients)
    torch_engine = Engine(TorchStepModel(result.model), bundle.vocab,
                          max_visits=engine.max_visits,
                          max_codes_per_visit=engine.max_codes_per_visit, max_length=L,
                          batch_size=16, windows=engine.windows)
    assert torch_engine.generate(demo[:9], "plain", seed=4).token_ids == out.token_ids[:9]


def test_a_bundle_without_the_rule_decodes_in_one_window(long_bundle, tmp_path) -> None:
    from app.bundle import read_manifest
    from training.bundle import write_manifest

    result, _ = long_bundle
    old = tmp_path / "old"
    shutil.copytree(result.bundle_dir, old)
    manifest = read_manifest(old)
    del manifest[MANIFEST_KEY]  # as a bundle written before the rule existed
    write_manifest(old, manifest)
    engine = Engine.from_bundle(old, intra_op_threads=1, batch_size=16)
    assert engine.windows is None
    out = engine.generate([(70.0, "F"), (65.0, "M")] * 10, "plain", seed=4)
    assert all(len(t) <= L for t in out.token_ids)


# -- bundles without windows: byte-identical to the engine before the rule ---------------------

# sha256 of the scenario's token ids, computed with the engine of the commit before windowing
PINNED = "b315a55b01f308e92ea7800d57bf1807ac9f4db2cb2eb15822cedf70876404bf"


def test_engine_without_windows_is_unchanged() -> None:
    rng = np.random.default_rng(5)
    codes = CODES[:8]
    train = [Patient(f"t{i}", float(rng.integers(20, 85)), "FM"[i % 2],
                     tuple(tuple(sorted(set(rng.choice(codes, 3).tolist())))
                           for _ in range(int(rng.integers(1, 5))))) for i in range(80)]
    vocab = Vocabulary.from_patients(train)
    engine = Engine(RandomStepModel(len(vocab), seed=2, scale=1.0), vocab, max_visits=6,
                    max_codes_per_visit=4, max_length=24, batch_size=7,
                    cooccurrence=CooccurrenceStats.from_vocab(build_cooccurrence(train, vocab),
                                                              vocab),
                    retrieval=RetrievalIndex.from_patients(train, vocab))
    demo = [(float(a), "FM"[i % 2]) for i, a in enumerate(range(20, 80, 3))]
    out = []
    for strategy, kw in (("plain", {}), ("plain", {"must_include": ["486"]}),
                         ("plain", {"exclude": ["4019"]}), ("cooccurrence", {}),
                         ("rerank", {}), ("retrieve_edit", {"params": {"min_distance": 0.0}})):
        out.append(engine.generate(demo, strategy, seed=11, **kw).token_ids)
    assert hashlib.sha256(json.dumps(out).encode()).hexdigest() == PINNED


def test_rolling_engine_keeps_the_grammar_and_required_codes() -> None:
    vocab = Vocabulary.from_patients([Patient("a", 50.0, "F", (tuple(CODES),))])
    for seed in range(3):
        engine = Engine(RandomStepModel(len(vocab), seed=seed, scale=0.5), vocab,
                        max_visits=30, max_codes_per_visit=5, max_length=24, batch_size=16,
                        windows=WindowRule(24, years_per_visit=0.5))
        demo = [(60.0, "F"), (30.0, "M")] * 24
        out = engine.generate(demo, "plain", seed=seed, must_include=["486", "4019"])
        for p, t in zip(out.patients, out.token_ids, strict=True):
            _assert_well_formed(t, 30, 5)
            assert any("486" in v for v in p.visits) and any("4019" in v for v in p.visits)
        assert max(len(t) for t in out.token_ids) > 24
        again = engine.generate(demo[::-1], "plain", seed=seed, must_include=["486", "4019"],
                                row_indices=list(range(len(demo)))[::-1])
        assert again.token_ids == out.token_ids[::-1]  # rows do not depend on their batch


def test_continuation_prompt_marks_hidden_history() -> None:
    rule = WindowRule(16)
    assert rule.context_tokens == 8
    assert continuation_prompt([[7, 8]]) == [TOKENS.bos, TOKENS.mask, TOKENS.visit, 7, 8,
                                             TOKENS.end_visit, TOKENS.eos]
    # older visits go first, then the oldest one's last codes, to fit the budget
    assert rule.prompt([[6], [7, 8, 9, 10]]) == [TOKENS.bos, TOKENS.mask, TOKENS.visit, 7, 8,
                                                 9, TOKENS.end_visit, TOKENS.eos]
