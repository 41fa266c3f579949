#!/usr/bin/env bash
# Set up from nothing and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh train,serve,dev
# The /docs browser test uses Debian's headless chromium, the fault tests a redis-server of their
# own: install them once where they are missing.
missing=""
command -v chromium >/dev/null || missing="$missing chromium"
command -v redis-server >/dev/null || missing="$missing redis-server"
if [ -n "$missing" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) \
        >/dev/null 2>&1 || echo "warning: could not install$missing; tests needing them skip" >&2
fi
# Integration tests use the machine's Redis on 127.0.0.1:6379; start one if none answers.
if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    if command -v redis-server >/dev/null; then
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
            --logfile "$(mktemp -t redis-ci.XXXX.log)"
        for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
    fi
fi
# Lint and the import contracts (pyproject.toml) fail the run before any test does.
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"
