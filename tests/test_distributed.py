"""Data-parallel training in 2 real processes (torchrun, gloo on CPU; training.distributed).

One launch of tests/ddp_job.py trains, in one process group, an uninterrupted run and an
interrupted one that is then resumed, and checks DDP's gradient against the whole batch's; one
``synthehr train --nproc 2`` with the same config must give the same weights (seeded) and a
valid bundle. A one-process run of the same config is the reference for the semantics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist
from safetensors.torch import load_file

from app.bundle import load_bundle, read_manifest, verify_bundle
from training.distributed import SINGLE, Context, context, shard_rows

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DATA = REPO.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _config():
    sys.path.insert(0, str(TESTS))
    try:
        from ddp_job import tiny_config
    finally:
        sys.path.remove(str(TESTS))
    return tiny_config()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process job, the 2-process CLI run and the 1-process reference."""
    if not (DATA / "mimic3-demo").is_dir():
        pytest.skip(f"MIMIC-III demo is absent: {DATA / 'mimic3-demo'} (see ../shared/data)")
    from training.distributed import launch
    from training.loaders import load_corpus
    from training.trainer import train

    root = tmp_path_factory.mktemp("ddp")
    config = _config()
    launch(2, "ddp_job:run", {"root": str(root / "job"), "config": config.to_dict()},
           pythonpath=str(TESTS))
    (root / "config.json").write_text(config.to_json())
    cli = subprocess.run(
        [sys.executable, "-m", "app.cli", "train", "--source", "mimic3", "--data",
         str(DATA / "mimic3-demo"), "--out", str(root / "cli"), "--config",
         str(root / "config.json"), "--nproc", "2", "--no-progress", "--no-export"],
        capture_output=True, text=True, check=False, cwd=REPO)
    assert cli.returncode == 0, cli.stderr[-3000:]
    single = train(load_corpus("mimic3", DATA / "mimic3-demo"), root / "single", config,
                   progress=False, log=lambda m: None, export=False)
    observed = json.loads((root / "job" / "observed.json").read_text())
    return {"root": root, "observed": observed, "cli": cli, "single": single}


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / "model.safetensors"))


def test_two_process_cli_run_writes_a_valid_bundle(runs):
    out = runs["root"] / "cli"
    verify_bundle(out)
    bundle = load_bundle(out)
    manifest = read_manifest(out)
    assert manifest["metrics"]["distributed"]["processes"] == 2
    assert manifest["metrics"]["distributed"]["backend"] == "gloo"
    assert len(manifest["metrics"]["history"]) == 2
    assert manifest["metrics"]["stop_calibration"] is not None  # calibrated on rank 0
    assert bundle.vocab.n_codes == manifest["vocabulary"]["codes"]
    assert not (out / "checkpoint.pt").exists()
    # rank 0 alone logs: one line per epoch
    assert runs["cli"].stderr.count("epoch 1/2") == 1, runs["cli"].stderr[-3000:]


def test_two_process_runs_are_seeded(runs):
    """``synthehr train --nproc 2`` and the job's uninterrupted run: the same weights."""
    a, b = _weights(runs["root"] / "cli"), _weights(runs["root"] / "job" / "whole")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_process_resume_equals_uninterrupted(runs):
    observed = runs["observed"]
    assert observed["part"] == {"history": 1, "checkpoint": True, "manifest": False}
    assert observed["resumed_history"] == observed["whole_history"]
    a = _weights(runs["root"] / "job" / "whole")
    b = _weights(runs["root"] / "job" / "part")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    verify_bundle(runs["root"] / "job" / "part")


def test_rank_zero_plans_the_time_budget_for_every_rank(runs):
    """A budget spent at once cuts the plan below train.epochs=3; every rank stops with it
    (a rank that planned otherwise would hang the run)."""
    budget = runs["observed"]["budget"]
    assert budget["stopped_by"] == "time_budget"
    assert budget["epochs"] == budget["planned"] < 3


def test_ddp_gradient_is_the_whole_batch_gradient(runs):
    grad = runs["observed"]["gradient"]
    assert grad["five_missing"] == 0 and grad["one_missing"] == 0
    assert grad["five"] < 1e-5 and grad["one"] < 1e-5, grad


def test_two_processes_train_like_one(runs):
    """Same batches, same corruption, same steps: the per-epoch training loss of 2 processes is
    that of 1 up to dropout (drawn per rank) and float rounding."""
    one = [h["train_loss"] for h in runs["single"].history]
    two = runs["observed"]["whole_history"]
    assert len(one) == len(two) == 2
    assert two == pytest.approx(one, rel=5e-3)
    schedule = read_manifest(runs["root"] / "cli")["metrics"]["schedule"]
    assert schedule["steps_per_epoch"] == runs["single"].manifest["metrics"]["schedule"][
        "steps_per_epoch"]


def test_rows_are_shared_out_evenly():
    assert shard_rows(5, 0, 2).tolist() == [0, 2, 4]
    assert shard_rows(5, 1, 2).tolist() == [1, 3]
    assert shard_rows(1, 1, 2).tolist() == []
    rows = sorted(r for rank in range(3) for r in shard_rows(10, rank, 3).tolist())
    assert rows == list(range(10))


def test_one_process_context_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ddp = context("cpu")
    assert ddp is SINGLE and not ddp.active and ddp.is_main
    assert ddp.sum_all(1.5, 3) == (1.5, 3)
    assert ddp.share({"a": 1}) == {"a": 1}
    assert ddp.seed(17) == 17 and ddp.manifest() == {}
    assert ddp.device(torch.device("cpu")) == torch.device("cpu")
    ddp.check(dp_epsilon=8.0)  # one process: DP-SGD is fine
    with pytest.raises(ValueError, match="one process only"):
        Context(rank=0, world=2).check(dp_epsilon=8.0)
    assert Context(rank=1, world=2).seed(17) != 17


def test_cli_refuses_dp_with_several_processes(tmp_path):
    from typer.testing import CliRunner

    from app.cli import app

    result = CliRunner().invoke(app, ["train", "--preset", "demo", "--out", str(tmp_path / "m"),
                                      "--nproc", "2", "--dp-epsilon", "8"])
    assert result.exit_code != 0
    assert "one process only" in result.output
    result = CliRunner().invoke(app, ["train", "--preset", "demo", "--out", str(tmp_path / "m"),
                                      "--nproc", "0"])
    assert result.exit_code != 0 and "at least 1" in result.output
