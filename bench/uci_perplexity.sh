#!/usr/bin/env bash
# Test per-code perplexity on UCI Diabetes 130: hierarchical vs flat (same size, same epochs)
# vs the unigram baseline. Trains two bundles into models/ (resumable: rerun with RESUME=1),
# then prints one markdown table. 2-core machine: both trainings run side by side on 1 thread.
#   bench/uci_perplexity.sh                 # full budget (6 epochs, early stopping)
#   EPOCHS=3 MAX_MINUTES=20 bench/uci_perplexity.sh   # a smaller documented budget
set -euo pipefail
cd "$(dirname "$0")/.."
UCI=${UCI:-../shared/data/uci-diabetes-130/diabetic_data.csv.gz}
EPOCHS=${EPOCHS:-6}
MAX_MINUTES=${MAX_MINUTES:-0}
PY=${PY:-.venv/bin/python}
mkdir -p runs
common=(--source uci --data "$UCI" --epochs "$EPOCHS" --threads 1 --max-minutes "$MAX_MINUTES"
        --set model.ffn_dim=256 --set train.patience=2 --no-progress --no-export --force)
[ "${RESUME:-0}" = 1 ] && common+=(--resume)
nice -n 10 "$PY" -m app.cli train "${common[@]}" --out models/uci-hier > runs/uci-hier.log 2>&1 &
nice -n 10 "$PY" -m app.cli train "${common[@]}" --flat --out models/uci-flat > runs/uci-flat.log 2>&1 &
wait
"$PY" -m training.perplexity --source uci --data "$UCI" models/uci-hier models/uci-flat
