#!/usr/bin/env bash
# Run the quality gates and the whole test suite (installs what it needs first).
# Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/check.sh --no-mypy   # mypy --strict runs as tests/common/test_types.py
exec .venv/bin/python -m pytest "$@"
