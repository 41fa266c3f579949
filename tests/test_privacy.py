"""Privacy: small-cell suppression, DP-SGD (Opacus) settings, budget and accountant, the DP
bundle's manifest and what it leaves out, ``retrieve_edit`` refused with the reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.bundle import load_bundle
from app.cli import app as cli_app
from app.corpus import Corpus, Patient
from app.vocab import Vocabulary, code_patient_counts
from training.config import ObjectiveConfig, RunConfig, TrainConfig, model_config_for
from training.privacy.dp_sgd import (
    DPSettingsError,
    PrivateSGD,
    check_model,
    composed_epsilon,
    plan_dp,
)
from training.privacy.release import STATS_RELEASES, gaussian_clipped_sum

COMMON = ["4019", "25000", "4280", "2724", "42731", "5849", "41401", "5990"]
RARE = ["1629", "1970", "V1582"]  # each carried by fewer than 11 patients


def corpus(n: int = 900, seed: int = 0) -> Corpus:
    """Patients over 8 common codes; 3 rare codes carried by 1-5 patients each (one patient
    carries 1629 in 12 visits: frequent in visits, rare in patients)."""
    rng = np.random.default_rng(seed)
    patients = []
    for i in range(n):
        visits = []
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(1, 4))
            visits.append(tuple(rng.choice(COMMON, size=k, replace=False).tolist()))
        patients.append([f"p{i}", float(rng.integers(20, 90)), "F" if i % 2 else "M", visits])
    patients[0][3] = [("1629", "4019")] * 12
    for j, code in enumerate(RARE[1:]):
        for p in patients[10 + 10 * j: 15 + 10 * j]:
            p[3] = [*p[3], (code,)]
    return Corpus("test", [Patient(pid, age, sex, tuple(v)) for pid, age, sex, v in patients])


# -- small-cell suppression -----------------------------------------------------------------------

def test_vocabulary_counts_patients_not_visits_for_suppression():
    pats = corpus().patients
    carriers = code_patient_counts(pats)
    assert carriers["1629"] == 1  # 12 visits of one patient: still one patient
    full = Vocabulary.from_patients(pats)
    vocab = Vocabulary.from_patients(pats, min_patients=11)
    assert set(RARE) <= set(full.codes) and not set(RARE) & set(vocab.codes)
    assert set(COMMON) == set(vocab.codes) and vocab.suppressed == len(RARE)
    assert Vocabulary.from_patients(pats, min_patients=5).codes.count("1970") == 1


def test_suppressed_codes_never_generated_nor_listed(tmp_path):
    """Non-DP bundle with k = 11: the vocabulary, statistics and index hold no rare code, and
    2,000 generated patients (every strategy, must_include refused) carry none."""
    from app.decoding.engine import Engine
    from training.trainer import train

    cfg = RunConfig(model=model_config_for("tiny")).override(
        {"train.epochs": 1, "train.batch_size": 64, "train.threads": 1,
         "train.warmup_steps": 5, "train.fidelity_patients": 500,
         "train.calibration_patients": 500})
    result = train(corpus(), tmp_path / "b", cfg, progress=False, log=lambda m: None)
    small = result.manifest["privacy"]["small_cell_suppression"]
    assert small == {"min_patients_per_code": 11, "codes_kept": len(COMMON),
                     "codes_removed": len(RARE), "rule": small["rule"]}
    bundle = load_bundle(tmp_path / "b")
    assert not set(RARE) & set(bundle.vocab.codes)
    stats_text = (tmp_path / "b" / "reference_stats.json").read_text()
    index = bundle.load_train_index()
    assert not any(code in stats_text for code in RARE)
    assert not {c for p in index for v in p["visits"] for c in v} & set(RARE)
    engine = Engine.from_bundle(bundle)
    rng = np.random.default_rng(1)
    demo = [(float(a), "F" if s else "M") for a, s in zip(rng.integers(20, 90, 500),
                                                       rng.integers(0, 2, 500), strict=True)]
    seen = set()
    for strategy in ("plain", "cooccurrence", "rerank", "retrieve_edit"):
        for p in engine.generate(demo, strategy, seed=3).patients:
            seen.update(c for v in p.visits for c in v)
    assert seen and not seen & set(RARE)
    from app.decoding.errors import UnknownCodeError

    with pytest.raises(UnknownCodeError):
        engine.generate(demo[:1], "plain", must_include=["1629"])


# -- DP settings, calibration and the accountant ---------------------------------------------------

def _tc(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "dp_epsilon": 8.0, **kw})


@pytest.mark.parametrize("eps", [0.0, -1.0, math.inf, math.nan])
def test_bad_epsilon_refused(eps):
    with pytest.raises(DPSettingsError, match="--dp-epsilon must be a positive finite"):
        plan_dp(_tc(dp_epsilon=eps), ObjectiveConfig(), 1000, stats_releases=2)


def test_delta_must_be_below_one_over_n():
    with pytest.raises(DPSettingsError, match=r"--dp-delta must lie in \(0, 1/1,000\)"):
        plan_dp(_tc(dp_delta=1e-3), ObjectiveConfig(), 1000, stats_releases=2)
    plan = plan_dp(_tc(), ObjectiveConfig(), 1000, stats_releases=2)
    assert plan.delta == pytest.approx(1000 ** -1.1)


def test_unreachable_budget_says_what_would_reach_it():
    with pytest.raises(DPSettingsError) as err:
        plan_dp(_tc(dp_epsilon=0.5, epochs=50, batch_size=500), ObjectiveConfig(), 1000,
                stats_releases=2)
    text = str(err.value)
    assert "cannot be reached with 50 epochs of batch 500" in text
    assert "What would reach it: --dp-epsilon" in text and "--epochs" in text
    floor = float(text.split("What would reach it: --dp-epsilon ")[1].split()[0])
    plan = plan_dp(_tc(dp_epsilon=floor, epochs=50, batch_size=500), ObjectiveConfig(), 1000,
                   stats_releases=2)
    assert plan.epsilon_planned <= floor
    fewer = int(text.split("--epochs ")[1].split()[0])
    assert plan_dp(_tc(dp_epsilon=0.5, epochs=fewer, batch_size=500), ObjectiveConfig(), 1000,
                   stats_releases=2).epsilon_planned <= 0.5
    with pytest.raises(DPSettingsError, match="statistics share"):
        plan_dp(_tc(dp_epsilon=1e-4), ObjectiveConfig(), 1000, stats_releases=2)


def test_settings_that_would_leak_are_refused():
    with pytest.raises(DPSettingsError, match="cooc_weight"):
        plan_dp(_tc(), ObjectiveConfig(cooc_weight=0.1), 1000, stats_releases=2)
    with pytest.raises(DPSettingsError, match="resume"):
        plan_dp(_tc(), ObjectiveConfig(), 1000, stats_releases=2, resume=True)


@pytest.mark.parametrize("eps", [1.0, 3.0, 8.0])
def test_plan_spends_at_most_the_budget(eps):
    plan = plan_dp(_tc(dp_epsilon=eps, epochs=3), ObjectiveConfig(), 5000,
                   stats_releases=STATS_RELEASES)
    total = composed_epsilon(plan.delta, sgd=(plan.noise_multiplier, plan.sample_rate,
                                              plan.steps),
                             stats=(plan.stats_noise_multiplier, STATS_RELEASES))
    assert total == pytest.approx(plan.epsilon_planned) and total <= eps
    assert total >= 0.97 * eps  # the noise is not wastefully large
    assert plan.epsilon_stats_alone <= 0.1 * eps + 0.01
    assert plan.steps == 3 * math.ceil(5000 / 64)


def test_model_layer_opacus_cannot_handle_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(DPSettingsError, match="BatchNorm"):
        check_model(model)


def test_gaussian_release_clips_each_patient():
    import scipy.sparse as sp

    rows = sp.csr_matrix(np.array([[3.0, 4.0], [1.0, 0.0]]))
    out = gaussian_clipped_sum(rows, 1.0, 0.0, np.random.default_rng(0))
    assert out == pytest.approx([0.6 + 1.0, 0.8])  # the first row scaled to norm 1


def test_per_sample_gradients_equal_single_patient_backward():
    from training.dataset import collate, encode_patients
    from training.model import HierBart

    pats = corpus(60).patients
    vocab = Vocabulary.from_patients(pats)
    model = HierBart(model_config_for("tiny", dropout=0.0), vocab)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = plan_dp(_tc(epochs=1, batch_size=8), ObjectiveConfig(), len(pats), stats_releases=2)
    private = PrivateSGD(model, opt, plan, ObjectiveConfig(), seed=0)
    enc = encode_patients(pats[:6], vocab, 64)
    batch = collate(enc, np.random.default_rng(0), ObjectiveConfig(), mode="full")
    grads, _ = private._per_sample(batch)
    model.eval()
    for i in (0, 4):
        model.zero_grad()
        # the same row as in the batch (codes in the batch's shuffled order), unpadded
        width = int((batch.labels[i] != 0).sum())
        out = private.loss_module(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1],
                                  batch.decoder_input_ids[i:i + 1, :width],
                                  batch.labels[i:i + 1, :width], batch.age[i:i + 1],
                                  batch.sex[i:i + 1])
        out[0].sum().backward()
        for name, p in private.loss_module.named_parameters():
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.allclose(grads[name][i], ref, atol=1e-5, rtol=1e-3), name


# -- a DP bundle end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dp_bundle(tmp_path_factory):
    from training.trainer import train

    out = tmp_path_factory.mktemp("dp") / "dp"
    cfg = RunConfig(model=model_config_for("tiny")).override(
        {"train.epochs": 2, "train.batch_size": 64, "train.threads": 1,
         "train.warmup_steps": 5, "train.dp_epsilon": 8.0, "train.patience": 5,
         "train.fidelity_patients": 500, "train.calibration_patients": 500})
    return train(corpus(), out, cfg, progress=False, log=lambda m: None)


def test_dp_manifest_records_the_guarantee(dp_bundle):
    dp = dp_bundle.manifest["privacy"]["differential_privacy"]
    assert 0 < dp["epsilon"] <= dp["epsilon_target"] == 8.0
    assert dp["epsilon"] >= 7.5  # the planned steps were taken: the budget is spent
    n_train = dp_bundle.manifest["splits"]["train_used"]
    assert dp["delta"] == pytest.approx(n_train ** -1.1) and dp["delta"] < 1 / n_train
    assert dp["accountant"].startswith("RDP") and dp["max_grad_norm"] == 1.0
    assert dp["noise_multiplier"] > 0 and dp["steps"] == dp["steps_planned"]
    assert dp["split"]["composed_total"] == pytest.approx(dp["epsilon"])
    assert dp["split"]["statistics_alone"] <= 0.81
    assert dp_bundle.manifest["metrics"]["stopped_by"] == "privacy_budget"
    assert set(dp["unavailable_strategies"]) == {"cooccurrence", "rerank", "retrieve_edit"}
    small = dp_bundle.manifest["privacy"]["small_cell_suppression"]
    assert small["min_patients_per_code"] == 11 and small["codes_removed"] is None


def test_dp_bundle_ships_only_released_statistics(dp_bundle):
    out = dp_bundle.bundle_dir
    assert not (out / "cooccurrence.npz").exists()
    assert not (out / "train_index.json.gz").exists()
    bundle = load_bundle(out)
    assert bundle.cooccurrence is None
    stats = bundle.reference_stats
    assert stats["differentially_private"] is True and "age_years" not in stats
    assert "sex" not in stats
    # the DP vocabulary: the common codes come through the noise, the rare ones never do
    assert set(bundle.vocab.codes) <= set(COMMON) and len(bundle.vocab.codes) >= 4
    assert json.loads((out / "vocab.json").read_text())["codes"] == bundle.vocab.codes


def test_dp_bundle_refuses_retrieve_edit_with_reason(dp_bundle):
    from app.decoding.engine import Engine
    from app.decoding.errors import StrategyUnavailableError
    from app.runtime.generators import BundleGenerator
    from app.service.api import create_app
    from app.service.store import EmbeddedStore
    from app.settings import Settings

    engine = Engine.from_bundle(dp_bundle.bundle_dir)
    with pytest.raises(StrategyUnavailableError, match="differential privacy"):
        engine.generate([(50.0, "F")], "retrieve_edit")
    gen = BundleGenerator(dp_bundle.bundle_dir)
    assert gen.strategies == ["plain"]
    with TestClient(create_app(Settings(redis_url=None), generator=gen,
                               store=EmbeddedStore())) as client:
        r = client.post("/v1/patients", json={"n": 2, "age": 60, "sex": "F",
                                               "strategy": "retrieve_edit", "seed": 1})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["field"] == "strategy"
        assert "differential privacy" in detail["msg"] and "retrieval index" in detail["msg"]
        r = client.post("/v1/cohorts", json={"size": 10, "strategy": "retrieve_edit"})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "strategy"
        r = client.post("/v1/patients", json={"n": 2, "age": 60, "sex": "F", "seed": 1})
        assert r.status_code == 200, r.text
        info = client.get("/v1/models").json()
        dp = info["privacy"]["differential_privacy"]
        assert dp["epsilon"] <= 8.0 and dp["delta"] > 0 and dp["noise_multiplier"] > 0
        assert info["strategies"] == ["plain"]
        assert "retrieve_edit" in info["unavailable_strategies"]


def test_info_shows_dp_fields(dp_bundle):
    result = CliRunner().invoke(cli_app, ["info", str(dp_bundle.bundle_dir)])
    assert result.exit_code == 0, result.output
    for text in ("differential privacy", "epsilon", "noise multiplier", "clipping norm",
                 "small-cell suppression", "k = 11"):
        assert text in result.output, text


def test_cli_refuses_bad_dp_settings_before_training(tmp_path):
    runner = CliRunner()
    for args, message in ((["--dp-epsilon", "0"], "--dp-epsilon must be a positive finite"),
                          (["--dp-epsilon", "-2"], "--dp-epsilon must be a positive finite"),
                          (["--dp-delta", "1e-6"], "--dp-delta needs --dp-epsilon"),
                          (["--dp-epsilon", "8", "--dp-delta", "0.01"],
                           "--dp-delta must lie in (0, 1/1,600)")):
        result = runner.invoke(cli_app, ["train", "--preset", "demo", "--size", "tiny",
                                         "--out", str(tmp_path / "b"), "--no-progress", *args])
        assert result.exit_code != 0, args
        assert message in " ".join(result.output.split()), (args, result.output)
        assert not (tmp_path / "b" / "manifest.json").exists()
