#!/usr/bin/env bash
# The main job from nothing: set up, build the embedded default bundle (the simulated demo
# preset) if it is missing, and serve it on :8000 (OpenAPI docs at /docs).
# Environment: SYNTHEHR_BUNDLE (default models/demo), REDIS_URL (default: embedded store),
# PORT (default 8000); see app/settings.py for the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh train,serve
bundle="${SYNTHEHR_BUNDLE:-models/demo}"
if [ ! -f "$bundle/manifest.json" ]; then
    echo "building the demo bundle into $bundle (a tiny model on a 30-second training budget)"
    .venv/bin/synthehr train --preset demo --out "$bundle"
fi
export SYNTHEHR_BUNDLE="$bundle"
exec .venv/bin/synthehr serve --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}"
