"""The served API docs in a real browser (headless Debian chromium), with no network: Swagger UI
and ReDoc come from assets installed with the package, never from a CDN."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from test_service_support import ROOT, free_port, tiny_bundle, wait_until_ready

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--virtual-time-budget=15000"]
OPERATIONS = ["/v1/patients", "/v1/cohorts", "/v1/cohorts/{job_id}",
              "/v1/cohorts/{job_id}/result", "/v1/models", "/v1/codes/{code}", "/health",
              "/ready", "/metrics"]


@pytest.fixture(scope="module")
def server():
    bundle = tiny_bundle()
    if bundle is None:
        pytest.skip("no bundle could be built here")
    port = free_port()
    env = {**os.environ, "SYNTHEHR_BUNDLE": str(bundle)}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def dump_dom(url: str) -> str:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium)")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                             check=False, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return out.stdout.decode()


def test_swagger_ui_lists_every_operation(server):
    dom = dump_dom(f"{server}/docs")
    assert "swagger-ui" in dom
    for path in OPERATIONS:
        assert f'data-path="{path}"' in dom, f"{path} not rendered in /docs"
    assert 'class="opblock-summary-method">DELETE' in dom


def test_redoc_renders(server):
    dom = dump_dom(f"{server}/redoc")
    assert "Generate up to 100 patients synchronously" in dom
    assert "Download a finished cohort" in dom
