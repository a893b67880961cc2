#!/usr/bin/env bash
# Create the project-local .venv and install normcore into it (idempotent).
# torch is pinned first: a CPU wheel of 2.13.0 is what the pyproject range resolves to here, and
# installing it first stops pip from pulling a CUDA build with gigabytes of packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==${NORMCORE_TORCH_VERSION:-2.13.0}"
fi
# the library plus every extra: service (API, worker), data, client, onnx, and the test tools
.venv/bin/pip install --quiet -e ".[service,data,client,onnx,test]"
# What serve.sh installs is a subset of the above: tell it this pyproject is installed, so the
# first `bash scripts/serve.sh` after setup starts at once instead of installing again.
if command -v sha256sum >/dev/null; then sha256sum pyproject.toml; else shasum -a 256 pyproject.toml; fi |
  cut -d' ' -f1 >.venv/.normcore-serve.sha256
