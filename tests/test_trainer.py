"""The trainer end to end (MIMIC-III demo, the demo preset), resuming, the bundle format and
its checks, the ONNX export hook, and ``synthehr train`` / ``synthehr info``."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner

from app.bundle import BundleError, load_bundle, read_manifest, verify_bundle
from app.cli import app
from training.bundle import add_bundle_file
from training.config import RunConfig, model_config_for
from training.model import HierBart

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def tiny_run(**train) -> RunConfig:
    cfg = RunConfig(model=model_config_for("tiny", max_positions=512))
    return cfg.override({"train.batch_size": 16, "train.epochs": 2, "train.warmup_steps": 5,
                         "train.threads": 1, "objective.cooc_weight": 0.1,
                         # a 100-patient corpus: a small fidelity sample keeps the tests fast
                         "train.fidelity_patients": 500, "train.calibration_patients": 500,
                         **{f"train.{k}": v for k, v in train.items()}})


@pytest.fixture(scope="module")
def mimic_corpus():
    if not (DATA / "mimic3-demo").is_dir():
        pytest.skip(f"MIMIC-III demo is absent: {DATA / 'mimic3-demo'} (see ../shared/data)")
    from training.loaders import load_corpus

    return load_corpus("mimic3", DATA / "mimic3-demo")


@pytest.fixture(scope="module")
def mimic_bundle(mimic_corpus, tmp_path_factory):
    from training.trainer import train

    out = tmp_path_factory.mktemp("bundle") / "mimic"
    result = train(mimic_corpus, out, tiny_run(), progress=False, log=lambda m: None,
                   export=False)
    return result


def test_trainer_end_to_end_on_mimic_demo(mimic_bundle):
    out = mimic_bundle.bundle_dir
    manifest = read_manifest(out)
    for name in ("manifest.json", "config.json", "model.safetensors", "vocab.json",
                 "cooccurrence.npz", "reference_stats.json", "train_index.json.gz"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.pt").exists()
    assert manifest["format_version"] == 1
    assert manifest["data"]["source"] == "mimic3" and len(manifest["data"]["content_hash"]) == 64
    assert manifest["splits"]["train"] == 82
    metrics = manifest["metrics"]
    assert len(metrics["history"]) == 2
    for key in ("train_loss", "val_loss", "val_ppl_code", "train_ppl_code"):
        assert metrics["history"][0][key] > 0
    assert metrics["test"]["ppl_code_from_demographics"] > 1
    bundle = load_bundle(out)
    assert bundle.vocab.n_codes == manifest["vocabulary"]["codes"]
    assert bundle.cooccurrence.shape == (bundle.vocab.n_codes,) * 2
    assert bundle.reference_stats["n_patients"] == 82
    assert sum(bundle.reference_stats["visits_per_patient"].values()) == 82
    # small-cell suppression (default k = 11): the vocabulary, the index and the statistics
    # hold only codes at least 11 training patients carry; patients left without any code
    # are not in the index
    small = manifest["privacy"]["small_cell_suppression"]
    assert small["min_patients_per_code"] == 11 and small["codes_removed"] > 0
    assert small["codes_kept"] == bundle.vocab.n_codes
    assert manifest["privacy"]["differential_privacy"] is None
    index = bundle.load_train_index()
    kept = set(bundle.vocab.codes)
    assert {c for p in index for v in p["visits"] for c in v} <= kept
    assert 0 < len(index) < 82 and {"id", "age", "sex", "visits"} <= set(index[0])
    assert set(bundle.reference_stats["category_visit_counts"]) <= \
        {c[:4] if c.startswith("E") else c[:3] for c in kept}


def test_bundle_model_loads_with_identical_logits(mimic_bundle):
    model = mimic_bundle.model.eval()
    loaded = HierBart.from_bundle(mimic_bundle.bundle_dir)
    ids = torch.tensor([[1, 3, 10, 11, 4, 2]])
    age, sex = torch.tensor([63.0]), torch.tensor([1])
    with torch.no_grad():
        e1, m1 = model.encode(ids, torch.ones_like(ids), age, sex)
        e2, m2 = loaded.encode(ids, torch.ones_like(ids), age, sex)
        a, _ = model.decode(ids, age, sex, e1, m1)
        b, _ = loaded.decode(ids, age, sex, e2, m2)
    assert torch.equal(a, b)


def test_bundle_refuses_tampering_and_wrong_version(mimic_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mimic_bundle.bundle_dir, copy)
    verify_bundle(copy)
    stats = copy / "reference_stats.json"
    stats.write_text(stats.read_text().replace('"n_patients": 82', '"n_patients": 83'))
    with pytest.raises(BundleError, match="reference_stats.json fails its checksum"):
        load_bundle(copy)
    (copy / "vocab.json").unlink()
    with pytest.raises(BundleError, match="vocab.json is listed .* but missing"):
        verify_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)


def test_add_bundle_file_registers_checksum(mimic_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mimic_bundle.bundle_dir, copy)
    (copy / "encoder.onnx").write_bytes(b"graph")
    digest = add_bundle_file(copy, "encoder.onnx")
    assert read_manifest(copy)["files"]["encoder.onnx"] == digest
    verify_bundle(copy)
    (copy / "encoder.onnx").write_bytes(b"other")
    with pytest.raises(BundleError, match="encoder.onnx"):
        verify_bundle(copy)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_equals_uninterrupted_run(mimic_corpus, tmp_path, ema_decay):
    from training.trainer import train

    # with a weight average the checkpoint must carry it: the bundle gets the averaged weights
    run = tiny_run(epochs=3, patience=10, ema_decay=ema_decay)
    quiet = {"progress": False, "log": lambda m: None, "export": False}
    whole = train(mimic_corpus, tmp_path / "whole", run, **quiet)
    part = train(mimic_corpus, tmp_path / "part", run, stop_after_epochs=1, **quiet)
    assert (tmp_path / "part" / "checkpoint.pt").is_file()
    assert not (tmp_path / "part" / "manifest.json").exists()
    assert len(part.history) == 1
    resumed = train(mimic_corpus, tmp_path / "part", run, resume=True, **quiet)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]
    for (k, a), b in zip(whole.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_export_hook_is_called(mimic_corpus, tmp_path, monkeypatch):
    from training.trainer import train

    calls = []

    def export_onnx(model, bundle_dir):
        calls.append(bundle_dir)
        (Path(bundle_dir) / "encoder.onnx").write_bytes(b"fake")
        add_bundle_file(bundle_dir, "encoder.onnx")

    fake = types.ModuleType("training.export")
    fake.export_onnx = export_onnx
    monkeypatch.setitem(sys.modules, "training.export", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    result = train(mimic_corpus, tmp_path / "b", tiny_run(epochs=1), progress=False,
                   log=lambda m: None)
    assert calls == [tmp_path / "b"]
    assert "encoder.onnx" in result.manifest["files"]
    verify_bundle(tmp_path / "b")


def test_cli_train_and_info(mimic_corpus, tmp_path):
    out = tmp_path / "models" / "m"
    runner = CliRunner()
    args = ["train", "--source", "mimic3", "--data", str(DATA / "mimic3-demo"), "--out",
            str(out), "--size", "tiny", "--epochs", "1", "--threads", "1", "--no-progress",
            "--no-export", "--set", "train.batch_size=32", "--set", "model.max_positions=512"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "--force" in again.output
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "hierarchical" in info.output and "verified" in info.output
    raw = runner.invoke(app, ["info", str(out), "--json", "--no-verify"])
    assert json.loads(raw.output)["format"] == "synthehr-bundle"
    # info needs no torch: run it in a process where importing torch fails
    code = ("import sys; sys.modules['torch'] = None; from app.cli import app; "
            f"app(['info', {str(out)!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout


def test_trainer_on_demo_preset(tmp_path):
    pytest.importorskip("training.simulate", reason="training.simulate is not written yet")
    from training.simulate import simulate_corpus
    from training.trainer import train

    corpus = simulate_corpus("demo", 0).corpus
    run = tiny_run(epochs=1, batch_size=64, max_train_patients=600)
    result = train(corpus, tmp_path / "demo", run, progress=False, log=lambda m: None,
                   export=False)
    assert result.manifest["data"]["source"] == corpus.source
    assert result.manifest["splits"]["train_used"] == 600
    load_bundle(tmp_path / "demo")


def test_selection_keeps_the_latest_epoch_within_noise_of_the_best():
    """A lucky early fidelity draw does not beat later, annealed epochs equal within noise;
    a clearly worse late epoch is not selected; nll (lower is better) is relative."""
    from training.config import TrainConfig
    from training.trainer import _judge

    tc = TrainConfig(min_delta=1e-3, select_tolerance=0.01)

    def selected(scores, higher=True):
        best, chosen = float("nan"), -1
        for epoch, score in enumerate(scores):
            improved, keep = _judge(score, best, higher, tc)
            chosen = epoch if keep else chosen
            best = score if improved else best
        return chosen

    assert selected([0.80, 0.93, 0.90, 0.925, 0.922]) == 4  # 0.922 within 0.01 of 0.93
    assert selected([0.80, 0.93, 0.90, 0.925, 0.91]) == 3  # 0.91 is not
    assert selected([3.0, 2.5, 2.52, 2.6], higher=False) == 2  # within 1% of 2.5, not 4%
    improved, keep = _judge(0.9305, 0.93, True, tc)
    assert keep and not improved  # inside min_delta: kept, but patience is not reset


def test_weight_average_is_the_exponential_average_of_the_steps():
    from app.corpus import Patient
    from app.vocab import Vocabulary
    from training.trainer import _weight_average

    vocab = Vocabulary.from_patients([Patient("p", 50.0, "F", (("250.00", "401.9"),))])
    model = HierBart(model_config_for("tiny"), vocab)
    ema = _weight_average(model, 0.9, private=False, log=lambda m: None)
    name, param = next(iter(model.named_parameters()))
    seen = []
    for value in (1.0, 3.0, -2.0):
        with torch.no_grad():
            param.fill_(value)
        ema.update_parameters(model)
        seen.append(value)
    expected = seen[0]  # the first update copies, later ones move by the warmed-up decay
    for n, value in enumerate(seen[1:], start=1):
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * value
    averaged = dict(ema.module.named_parameters())[name]
    assert torch.allclose(averaged, torch.full_like(averaged, expected))
    assert _weight_average(model, 0.0, private=False, log=lambda m: None) is None
    said = []
    assert _weight_average(model, 0.9, private=True, log=said.append) is None and said
    with pytest.raises(ValueError, match="ema_decay"):
        _weight_average(model, 1.0, private=False, log=lambda m: None)
