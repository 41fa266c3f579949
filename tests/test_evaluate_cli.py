"""``synthehr evaluate`` end to end on the tiny demo bundle (tests/test_service_support.py):
reload the corpus the manifest records, re-split, decode with the real engine, score and write
the report; and its clear failures."""

from __future__ import annotations

import json
import shutil

import pytest
from test_service_support import tiny_bundle
from typer.testing import CliRunner

from app.cli import app

runner = CliRunner()
STRATEGIES = ("plain", "cooccurrence", "rerank", "retrieve_edit")


@pytest.fixture(scope="module")
def bundle():
    path = tiny_bundle()
    if path is None:
        pytest.skip("no tiny bundle could be built here (needs torch and the ONNX export)")
    return path


def _text(result) -> str:
    """stdout and stderr, with rich's line wrapping undone."""
    parts = [result.output]
    try:
        parts.append(result.stderr)
    except ValueError:  # click < 8.2 mixes stderr into output
        pass
    return " ".join(" ".join(parts).split())


def test_evaluate_writes_the_report(bundle, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, [
        "evaluate", "--bundle", str(bundle), "--strategies", ",".join(STRATEGIES),
        "--out", str(out), "--seed", "3", "--threads", "1", "--mia-size", "100",
        "--params", '{"rerank": {"candidates": 2}}', "--no-progress"])
    assert result.exit_code == 0, _text(result)
    for name in ("report.json", "report.html", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert report["order"] == [*STRATEGIES, "floor", "baseline"]
    assert set(rows) == {*STRATEGIES, "floor", "baseline"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    test_size = manifest["splits"]["test"]
    for name in (*STRATEGIES, "floor", "baseline"):
        assert rows[name]["n_patients"] == test_size, name
        assert rows[name]["well_formed"] == 1.0, name
    for name in STRATEGIES:
        assert rows[name]["validity"] == 1.0, name  # with the validity mask
    assert 0.0 <= rows["plain"]["validity_model_alone"] <= 1.0
    meta = report["meta"]
    assert meta["split_sizes"]["test"] == test_size
    assert meta["params"]["rerank"] == {"candidates": 2}
    assert meta["seed"] == 3
    assert "rerank" in (out / "report.md").read_text()
    assert "JSD" in result.output
    # the newer metrics and the Anonymeter audit, on every row including both references
    for name in (*STRATEGIES, "floor", "baseline"):
        for key in ("sequential_r2", "tail_jsd", "stratum_jsd_worst", "detection_auc",
                    "tstr_auroc", "attr_inference_f1", "anonymeter_inference"):
            assert key in rows[name], (name, key)
    assert meta["targets"] == "relative"
    assert "status" in report["details"]["anonymeter"]


def test_evaluate_uci_profile_and_bad_profile(bundle, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, [
        "evaluate", "--bundle", str(bundle), "--strategies", "plain", "--out", str(out),
        "--threads", "1", "--mia-size", "50", "--no-progress", "--targets", "uci",
        "--no-anonymeter"])
    assert result.exit_code == 0, _text(result)
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["targets"] == "uci"
    jsd = next(t for t in report["targets"] if t["metric"] == "jsd")
    assert (jsd["kind"], jsd["value"]) == ("absolute", 0.03)
    assert "anonymeter" not in report["details"]
    result = runner.invoke(app, ["evaluate", "--bundle", str(bundle), "--targets", "strict",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown target profile" in _text(result)


def test_unknown_strategy_exits_2_naming_it(bundle, tmp_path):
    result = runner.invoke(app, ["evaluate", "--bundle", str(bundle), "--strategies",
                                 "plain,beam_search", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    text = _text(result)
    assert "beam_search" in text and "unknown strategy" in text
    assert not (tmp_path / "r").exists()


def test_missing_bundle_and_missing_data(bundle, tmp_path):
    result = runner.invoke(app, ["evaluate", "--bundle", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "bundle not found" in _text(result)
    result = runner.invoke(app, ["evaluate", "--bundle", str(bundle), "--data",
                                 str(tmp_path / "missing.csv")])
    assert result.exit_code == 2
    assert "data not found" in _text(result)


def test_changed_data_is_refused(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["data"]["content_hash"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["evaluate", "--bundle", str(copy), "--out",
                                 str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "data changed" in _text(result)
