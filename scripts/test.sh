#!/usr/bin/env bash
# Set up .venv, start PostgreSQL and Redis if they are down, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -n "${NORMCORE_TEST_PROCS:-2}" --dist loadgroup -q "$@"
