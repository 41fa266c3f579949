#!/usr/bin/env bash
# Create .venv-audit: an interpreter with anonymeter for the evaluation's Anonymeter audit.
# anonymeter 1.1.0 requires numpy<1.27 and pyarrow<22, which the project's own environment
# (numpy 2) cannot hold, so it lives apart; training/anonymeter_runner.py runs in it and
# imports nothing from the project. Usage: scripts/audit_venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv-audit/bin/python ]; then
    "$python" -m venv .venv-audit
fi
.venv-audit/bin/python -m pip install --quiet "anonymeter==1.1.0"
.venv-audit/bin/python -c "import anonymeter.evaluators; print('anonymeter ready in .venv-audit')"
