#!/usr/bin/env bash
# Start the embedded service: API + one worker, SQLite store and broker, both supervised
# (restarted with backoff if they die); the admin token is in normcore-data/admin.token.
#
# Installs into .venv only when it must: on the first start, when pyproject.toml changed since
# the last install (its sha256 is kept in .venv/.normcore-serve.sha256), or when a package the
# service imports is missing. Code changes need no install (the package is installed editable).
# It installs what serving needs, normcore[service,data,client,onnx]: the embedded worker builds
# the dashboard's ONNX exports, so the onnx extra belongs to serving (it stays an extra for library
# users, who need not carry onnxruntime). The test tools are setup.sh's.
# NORMCORE_SERVE_INSTALL=1 forces an install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.normcore-serve.sha256
# What `normcore serve` imports, looked up without importing any (torch's import takes seconds).
NEEDED="torch normcore service worker fastapi uvicorn sse_starlette pydantic_settings sqlalchemy \
alembic psycopg celery kombu redis prometheus_client httpx sklearn PIL onnx onnxscript onnxruntime"

digest() {
  if command -v sha256sum >/dev/null; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1
}

installed() {
  [ -x .venv/bin/python ] && [ -x .venv/bin/normcore ] &&
    .venv/bin/python -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' $NEEDED 2>/dev/null
}

want=$(digest pyproject.toml)
have=$(cat "$STAMP" 2>/dev/null || true)
if [ "${NORMCORE_SERVE_INSTALL:-0}" = 1 ] || [ "$want" != "$have" ] || ! installed; then
  echo "serve.sh: installing normcore[service,data,client,onnx] into .venv" >&2
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  # torch first, as setup.sh does: a CPU wheel of the pinned version, not a CUDA build
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet "torch==${NORMCORE_TORCH_VERSION:-2.13.0}"
  fi
  .venv/bin/pip install --quiet -e ".[service,data,client,onnx]"
  echo "$want" >"$STAMP"
fi
exec .venv/bin/normcore serve "$@"
