#!/usr/bin/env bash
# Set up .venv and start the embedded service: API + one worker, SQLite store and broker, both
# supervised (restarted with backoff if they die); the admin token is in normcore-data/admin.token.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/normcore serve "$@"
