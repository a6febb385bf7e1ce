#!/usr/bin/env bash
# Quality gates: lint, format and strict typing (configured in pyproject.toml).
# scripts/test.sh runs the ruff gates before the tests; mypy --strict runs inside the
# suite (tests/common/test_types.py), and here too for `make check`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [[ "${1:-}" != "--no-mypy" ]]; then
    .venv/bin/python -m mypy
fi
