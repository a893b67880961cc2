#!/usr/bin/env bash
# Set up .venv and start the embedded service: API + one worker, SQLite store and broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/normcore serve "$@"
