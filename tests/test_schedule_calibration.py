"""The time-budgeted schedule, the corpus recipe, the stop calibration and the fast loss head."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.corpus import Patient
from app.decoding import Engine, RandomStepModel
from app.decoding.calibration import StopCalibration, hazards
from app.evaluation import ks_visits_per_patient
from app.vocab import Vocabulary
from training.calibrate import fit_stop_calibration
from training.schedule import GROW_UNTIL, BudgetSchedule, plan_epochs, warmup_for
from training.sizing import corpus_profile, patient_length, recipe_for

CODES = ["4019", "25000", "4280", "42731", "5849", "2724", "41401", "2859", "486", "5990"]


# -- schedule ---------------------------------------------------------------------------------
def test_plan_epochs_fits_the_budget():
    # 600 s budget, 100 s spent, 60 s per epoch, 50 s reserved: 450 s left = 7.5 more epochs
    assert plan_epochs(max_epochs=30, epochs_done=1, budget_s=600, elapsed_s=100, epoch_s=60,
                       reserve_s=50) == 8
    assert plan_epochs(max_epochs=5, epochs_done=1, budget_s=600, elapsed_s=100, epoch_s=60) == 5
    assert plan_epochs(max_epochs=30, epochs_done=0, budget_s=0, elapsed_s=0, epoch_s=60) == 30
    # over budget already: at least one epoch
    assert plan_epochs(max_epochs=30, epochs_done=0, budget_s=10, elapsed_s=20, epoch_s=60) == 1


def test_schedule_ends_annealed_and_never_grows_late():
    s = BudgetSchedule(warmup=10, total_steps=100, min_ratio=0.05)
    assert s(0) == pytest.approx(0.1)
    assert s(10) == pytest.approx(1.0)
    assert s(100) == pytest.approx(0.05)
    assert s(500) == pytest.approx(0.05)
    assert s.replan(60, step=20)  # shrink: allowed
    assert s(60) == pytest.approx(0.05)
    late = int(10 + GROW_UNTIL * 50) + 1
    assert not s.replan(200, step=late)  # grow after GROW_UNTIL: refused
    assert s.total_steps == 60
    early = BudgetSchedule(warmup=10, total_steps=100)
    assert early.replan(300, step=12) and early.total_steps == 300
    assert s.replan(5, step=40) and s.total_steps == 41  # never before the next step


def test_warmup_fits_a_small_corpus():
    # 3 steps per epoch (the claims corpus of issue 16): warmup ends inside the first epoch
    assert warmup_for(200, steps_per_epoch=3, total_steps=90) == 2
    assert warmup_for(200, steps_per_epoch=1000, total_steps=30_000) == 200
    assert warmup_for(200, steps_per_epoch=100, total_steps=1000) == 50


# -- recipe -----------------------------------------------------------------------------------
def _patients(n: int, visits: int, codes: int) -> list[Patient]:
    return [Patient(str(i), 50.0, "F", tuple(tuple(CODES[:codes]) for _ in range(visits)))
            for i in range(n)]


def test_recipe_follows_the_corpus():
    small = corpus_profile(_patients(100, 1, 3))
    assert small.tokens == 100 * patient_length(_patients(1, 1, 3)[0]) == 100 * 7
    size, over, reasons = recipe_for(small)
    assert size == "tiny" and over["model.max_positions"] == 32
    assert over["train.batch_size"] == 16  # at least 8 batches of 100 patients
    assert set(reasons) >= {"size", "model.max_positions", "train.batch_size"}
    big = corpus_profile(_patients(40_000, 3, 10))  # 38 tokens each, 1.5M tokens
    size, over, _ = recipe_for(big)
    assert size == "small" and over["model.max_positions"] == 64
    assert over["train.batch_size"] == 64
    assert "train.lr" not in over
    # differential privacy: 4x the batch (at most 1,024 and 8 batches an epoch), a higher rate
    _, dp, dp_reasons = recipe_for(big, dp=True)
    assert dp["train.batch_size"] == 256 and dp["train.lr"] == 4e-3
    assert "differential privacy" in dp_reasons["train.batch_size"]
    _, dp_small, _ = recipe_for(small, dp=True)
    assert dp_small["train.batch_size"] == 16  # 100 patients: still 8 batches an epoch
    # moment matching stays on (the config's default) for a small vocabulary, off past 3,000
    assert "objective.marginal_weight" not in over
    from dataclasses import replace

    _, wide, wide_reasons = recipe_for(replace(big, n_codes=3431))
    assert wide["objective.marginal_weight"] == 0.0
    assert "3,431 distinct codes" in wide_reasons["objective.marginal_weight"]


# -- stop calibration -------------------------------------------------------------------------
def test_hazards_from_a_histogram():
    h, at_risk = hazards({1: 6, 2: 3, 3: 1}, 4)
    assert at_risk.tolist() == [10, 10, 4, 1]
    assert h[1] == pytest.approx(0.6) and h[2] == pytest.approx(0.75) and h[3] == 1.0


def test_calibration_offsets_apply_where_they_belong():
    cal = StopCalibration(np.array([0, 1.0, 2.0]), np.array([0, 0, -1.0]))
    scores = np.zeros((4, 8), dtype=np.float32)
    out = cal.apply(scores, after_visit=np.array([True, True, False, False]),
                    n_visits=np.array([1, 5, 0, 0]), in_visit=np.array([False, False, True, True]),
                    n_codes=np.array([0, 0, 2, 0]), eos_id=2, end_visit_id=4)
    assert out[0, 2] == 1.0 and out[1, 2] == 2.0  # past the end: the last offset
    assert out[2, 4] == -1.0 and out[3, 4] == 0.0  # no </v> offset before the first code
    assert scores.sum() == 0  # a copy
    again = StopCalibration.from_dict(cal.to_dict())
    assert np.array_equal(again.end_patient, cal.end_patient)
    with pytest.raises(ValueError):
        StopCalibration(np.array([np.nan]))


def test_fit_matches_the_training_visit_histogram():
    rng = np.random.default_rng(0)
    # training patients with many repeat visits (mean about 2.5)
    train = [Patient(f"t{i}", float(rng.integers(20, 80)), "FM"[i % 2],
                     tuple((CODES[j % 10],) for j in range(int(rng.integers(1, 5)))))
             for i in range(2000)]
    vocab = Vocabulary.from_patients(train)
    engine = Engine(RandomStepModel(len(vocab), seed=3), vocab, max_visits=4,
                    max_codes_per_visit=3, max_length=32, batch_size=256)
    demographics = [(p.age, p.sex) for p in train[:1500]]
    before = ks_visits_per_patient(train, engine.generate(demographics, seed=9).patients)
    cal = fit_stop_calibration(engine, demographics, train, iterations=3, seed=1)
    after = ks_visits_per_patient(train, engine.generate(demographics, seed=9).patients)
    assert before > 0.1
    assert after < 0.04 < before
    assert not cal.empty and engine.calibration is not None
    assert cal.info["iterations"][0]["ks_visits_per_patient_vs_train"] == pytest.approx(
        before, abs=0.05)


def test_fitted_temperature_is_the_default_of_calibrated_strategies():
    rng = np.random.default_rng(4)
    train = [Patient(f"t{i}", float(rng.integers(20, 80)), "FM"[i % 2],
                     tuple((CODES[(i + j) % 10], CODES[(i + 3 * j + 1) % 10])
                           for j in range(int(rng.integers(1, 4)))))
             for i in range(300)]
    vocab = Vocabulary.from_patients(train)
    from app.decoding import RetrievalIndex

    index = RetrievalIndex.from_patients(train, vocab)
    demo = [(50.0, "F")] * 120

    def run(calibration, strategy="plain", params=None):
        engine = Engine(RandomStepModel(len(vocab), seed=5), vocab, retrieval=index,
                        max_visits=4, max_codes_per_visit=3, max_length=32,
                        calibration=calibration)
        return engine.generate(demo, strategy, params=params, seed=3)

    cold = StopCalibration(temperature=0.5)  # no offsets: only the temperature
    assert not cold.empty
    fitted = run(cold)
    assert fitted.params["temperature"] == 0.5
    assert fitted.to_json() == run(None, params={"temperature": 0.5}).to_json()
    assert fitted.to_json() != run(None).to_json()
    # a request that sets a temperature gets it, 1.0 included
    assert run(cold, params={"temperature": 1.0}).to_json() == run(None).to_json()
    # retrieve_edit decodes uncalibrated, at its own default
    keep = {"min_distance": 0.0, "max_retries": 5}
    assert run(cold, "retrieve_edit", keep).to_json() == run(None, "retrieve_edit", keep).to_json()
    again = StopCalibration.from_dict(cold.to_dict())
    assert again.temperature == 0.5 and StopCalibration().empty
    with pytest.raises(ValueError):
        StopCalibration(temperature=0.0)


def test_fit_calibration_keeps_one_unless_another_wins_by_the_margin():
    from training.calibrate import TEMPERATURE_MARGIN, fit_calibration

    rng = np.random.default_rng(0)
    train = [Patient(f"t{i}", float(rng.integers(20, 80)), "FM"[i % 2],
                     tuple((CODES[j % 10], CODES[(j + i) % 10])
                           for j in range(int(rng.integers(1, 4)))))
             for i in range(1200)]
    val = train[:400]
    vocab = Vocabulary.from_patients(train)
    engine = Engine(RandomStepModel(len(vocab), seed=3), vocab, max_visits=4,
                    max_codes_per_visit=3, max_length=32, batch_size=256)
    cal = fit_calibration(engine, val, 400, train, temperatures=[1.0, 0.5], seed=1)
    tried = {t["temperature"]: t["score"] for t in cal.info["temperature"]["tried"]}
    assert set(tried) == {1.0, 0.5}
    if cal.temperature == 0.5:
        assert tried[0.5] > tried[1.0] + TEMPERATURE_MARGIN
    else:
        assert cal.temperature == 1.0 and tried[0.5] <= tried[1.0] + TEMPERATURE_MARGIN
    assert engine.calibration is cal or (cal.empty and engine.calibration is None)
    # the stop offsets were fitted at the chosen temperature
    assert cal.info["iterations"]


# -- fast loss head ---------------------------------------------------------------------------
def test_target_log_probs_equal_the_full_distribution():
    torch = pytest.importorskip("torch")
    from training.config import model_config_for
    from training.model import HierBart

    patients = [Patient("a", 40.0, "F", (("4019", "4011", "25000", "25001", "V5861"),)),
                Patient("b", 60.0, "M", (("E8497", "2724", "4280", "42731"),))]
    vocab = Vocabulary.from_patients(patients)
    torch.manual_seed(0)
    model = HierBart(model_config_for("tiny"), vocab)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    h = torch.randn(64, model.config.d_model)
    target = torch.randint(2, len(vocab), (64,))
    target[target == 5] = 2  # <mask> is never a target
    full = model.output_log_probs(h).gather(1, target[:, None]).squeeze(1)
    fast = model.target_log_probs(h, target)
    assert torch.allclose(full, fast, atol=1e-4)
    assert math.isfinite(float(fast.detach().sum()))


def test_code_orders():
    from app.vocab import code_rank
    from training.dataset import encode_patients

    patients = [Patient("a", 40.0, "F", (("4019", "25000"), ("25000",))),
                Patient("b", 60.0, "M", (("4280", "25000", "4019"),))]
    vocab = Vocabulary.from_patients(patients)
    assert code_rank(vocab, "shuffle") is None
    by_freq = encode_patients(patients, vocab, 64, code_rank(vocab, "frequency"))
    assert [vocab.tokens[t] for t in by_freq[1].visits[0]] == ["25000", "4019", "4280"]
    by_tree = encode_patients(patients, vocab, 64, code_rank(vocab, "hierarchy"))
    assert [vocab.tokens[t] for t in by_tree[1].visits[0]] == ["25000", "4019", "4280"]
    assert [vocab.tokens[t] for t in by_tree[0].visits[0]] == ["25000", "4019"]
    with pytest.raises(ValueError, match="code_order"):
        code_rank(vocab, "alphabetical")


def test_recorded_date_format_reloads_the_corpus(tmp_path):
    """evaluate/calibrate reload a bundle's corpus with the date format training was given."""
    import typer

    from training.bundle import corpus_hash
    from training.cli.evaluate import load_bundle_corpus
    from training.loaders import load_corpus

    rows = ["patient_id,visit_id,code,age,sex,visit_time"]
    for i in range(30):
        rows.append(f"p{i},v{i}a,4019,{40 + i},F,15/01/2012")
        rows.append(f"p{i},v{i}b,25000,{40 + i},F,03/02/2012")
    path = tmp_path / "visits.csv"
    path.write_text("\n".join(rows) + "\n")
    corpus = load_corpus("generic", path, date_format="%d/%m/%Y")
    manifest = {"data": {"source": "generic", "path": str(path), "preset": None,
                         "date_format": "%d/%m/%Y",
                         "content_hash": corpus_hash(corpus.patients)}}
    again, _ = load_bundle_corpus(manifest, tmp_path, None)
    assert corpus_hash(again.patients) == corpus_hash(corpus.patients)
    assert again.patients[0].visits == (("4019",), ("25000",))  # day-first: January first
    manifest["data"]["date_format"] = None
    with pytest.raises(typer.Exit):
        load_bundle_corpus(manifest, tmp_path, None)  # not ISO 8601: refused, never guessed


def test_calibration_shapes_demographic_strategies_but_not_retrieve_edit():
    from app.decoding import RetrievalIndex

    rng = np.random.default_rng(1)
    train = [Patient(f"t{i}", float(rng.integers(20, 80)), "FM"[i % 2],
                     tuple((CODES[(i + j) % 10], CODES[(i + 2 * j + 1) % 10])
                           for j in range(int(rng.integers(1, 4)))))
             for i in range(300)]
    vocab = Vocabulary.from_patients(train)
    index = RetrievalIndex.from_patients(train, vocab)
    stop_late = StopCalibration(np.array([0.0, -4.0, -4.0, -4.0]))  # rarely end the patient

    def run(calibration, strategy, params=None):
        engine = Engine(RandomStepModel(len(vocab), seed=5), vocab, retrieval=index,
                        max_visits=4, max_codes_per_visit=3, max_length=32,
                        calibration=calibration)
        return engine.generate([(50.0, "F")] * 200, strategy, params=params, seed=3).to_json()

    assert run(None, "plain") != run(stop_late, "plain")
    params = {"min_distance": 0.0, "max_retries": 5}
    assert run(None, "retrieve_edit", params) == run(stop_late, "retrieve_edit", params)


@pytest.mark.parametrize("params", [{"alpha": 0.5}, {"alpha": 0.5, "bias": "npmi"}])
def test_cooccurrence_inherits_the_calibration(params):
    # The bias is added to the calibrated scores: every stop decision keeps its offset, also
    # at steps where other rows of the batch are inside a visit (the usual case).
    from app.cooccurrence import build_cooccurrence
    from app.decoding.strategies import CooccurrenceStats

    rng = np.random.default_rng(2)
    train = [Patient(f"t{i}", float(rng.integers(20, 80)), "FM"[i % 2],
                     tuple((CODES[(i + j) % 10], CODES[(i + 2 * j + 1) % 10])
                           for j in range(int(rng.integers(1, 4)))))
             for i in range(300)]
    vocab = Vocabulary.from_patients(train)
    stats = CooccurrenceStats.from_vocab(build_cooccurrence(train, vocab), vocab)
    stop_late = StopCalibration(np.array([0.0, -6.0, -6.0, -6.0]))  # rarely end the patient

    def visits(calibration, strategy):
        engine = Engine(RandomStepModel(len(vocab), seed=5), vocab, cooccurrence=stats,
                        max_visits=4, max_codes_per_visit=3, max_length=32,
                        calibration=calibration)
        given = params if strategy == "cooccurrence" else None
        cohort = engine.generate([(50.0, "F")] * 200, strategy, params=given, seed=3).patients
        return float(np.mean([len(p.visits) for p in cohort]))

    assert visits(stop_late, "plain") > visits(None, "plain") + 0.5
    # the calibrated cooccurrence cohort is as long as the calibrated plain one
    assert visits(stop_late, "cooccurrence") > visits(None, "cooccurrence") + 0.5
    assert abs(visits(stop_late, "cooccurrence") - visits(stop_late, "plain")) < 0.3
