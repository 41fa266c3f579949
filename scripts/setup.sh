#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the given extras (default: all).
# Usage: scripts/setup.sh [extras]      e.g. scripts/setup.sh serve
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train,serve,dev}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned (==2.13.0) in the train extra: the CPU build that lies on these machines.
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
