#!/usr/bin/env bash
# Run every benchmark with the project's venv; results land in bench/results/*.json.
#   bash bench/run_all.sh            # full runs (~7 min on 2 cores)
#   bash bench/run_all.sh --quick    # smoke runs (~2 min)
# Extra arguments are passed to every bench (e.g. --wait-quiet 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
if [[ ! -x "$PYTHON" ]]; then
    echo "no $PYTHON: run 'bash scripts/setup.sh' first" >&2
    exit 1
fi
for bench in bench_pull bench_watch bench_transcribe; do
    echo "=== $bench $*"
    "$PYTHON" -m "bench.$bench" "$@"
done
