#!/usr/bin/env bash
# Set up (idempotent), lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy gateway dsl media config
exec .venv/bin/pytest -q "$@"
