"""Deployment files, checked without a Docker engine: the Dockerfile and docker-compose.yml are
parsed, and what the serve image does is done for real in a fresh venv with only the ``serve``
extra (no torch): install, load a bundle, answer a request."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib

import httpx
import pytest
import yaml
from test_service_support import ROOT, free_port, tiny_bundle, wait_until_ready


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> [(instruction, arguments)] with line continuations joined."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            current = match.group(1) if match else f"stage{len(stages)}"
            stages[current] = [("FROM", args)]
        elif current is not None:
            stages[current].append((instruction, args))
    return stages


def test_dockerfile_serve_stage_installs_only_the_serve_extra():
    stages = dockerfile_stages()
    assert {"base", "serve", "train"} <= set(stages)
    assert list(stages)[-1] == "serve", "serve must be the default (last) stage"
    serve = stages["serve"]
    assert serve[0][1].split()[0] == "base"
    installs = [args for ins, args in serve if ins == "RUN" and "pip install" in args]
    assert len(installs) == 1
    extras = re.findall(r'"\.\[([^\]]*)\]"', installs[0])
    assert extras == ["serve"], installs[0]
    assert "torch" not in " ".join(args for _, args in serve).replace("'torch'", "")
    base_runs = [args for ins, args in stages["base"] if ins == "RUN"]
    assert not any("pip install" in r for r in base_runs)
    assert any(ins == "HEALTHCHECK" and "/health" in args for ins, args in serve)
    assert any(ins == "CMD" and "serve" in args for ins, args in serve)
    assert any(ins == "USER" for ins, _ in serve), "the API does not run as root"
    train_installs = [a for i, a in stages["train"] if i == "RUN" and "pip install" in a]
    assert train_installs and "train" in train_installs[0]


def test_serve_extra_has_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serve = " ".join(project["optional-dependencies"]["serve"]).lower()
    core = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "transformers"):
        assert heavy not in serve and heavy not in core
    for needed in ("fastapi", "uvicorn", "onnxruntime", "redis", "prometheus", "fastapi-offline",
                   "fsspec"):
        assert needed in serve


def test_compose_services_healthchecks_and_volumes():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "worker", "trainer"} <= set(services)
    for name in ("redis", "api", "worker"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    assert "redis-data" in compose["volumes"]
    assert any(str(v).startswith("redis-data:") for v in services["redis"]["volumes"])
    assert "--appendonly" in services["redis"]["command"]
    for name in ("api", "worker"):
        svc = services[name]
        assert svc["build"]["target"] == "serve"
        assert svc["environment"]["REDIS_URL"].startswith("redis://redis:")
        assert any(str(v).startswith("./models:/models") for v in svc["volumes"])
        # Large cohort results: one location the API and every worker see.
        results = svc["environment"]["SYNTHEHR_RESULTS_URL"]
        assert f"results:{results}" in svc["volumes"] and "results" in compose["volumes"]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert services["worker"]["command"][-1] == "worker"
    assert "8000:8000" in services["api"]["ports"]
    trainer = services["trainer"]
    assert trainer["build"]["target"] == "train" and trainer["restart"] == "no"
    assert "./models:/models" in trainer["volumes"]
    command = " ".join(trainer["command"])
    assert "manifest.json" in command and "--preset demo" in command  # only when missing


@pytest.mark.slow
def test_serve_only_venv_installs_loads_a_bundle_and_answers(tmp_path):
    """What the serve image does: pip install ".[serve]" into a clean venv (no torch), then
    `synthehr serve` loads a bundle and answers POST /v1/patients."""
    bundle = tiny_bundle()
    if bundle is None:
        pytest.skip("no bundle could be built here")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("synthehr\n")
    for folder in ("app", "training"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", f"{src}[serve]"],
                             check=False, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import importlib.util as u; "
            "print(u.find_spec('torch') is None, u.find_spec('fastapi_offline') is not None)")
    probe = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["True", "True"], "the serve install must not pull torch"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PYTHONPATH")}
    env["SYNTHEHR_BUNDLE"] = str(bundle)
    proc = subprocess.Popen([str(venv / "bin" / "synthehr"), "serve", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc)
        r = httpx.post(f"{base}/v1/patients", json={"n": 2, "age": 70, "sex": "M", "seed": 1},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["patients"]) == 2
        assert httpx.get(f"{base}/docs", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
