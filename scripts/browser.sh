#!/usr/bin/env bash
# Install Debian's Chromium for the dashboard's browser tests (tests/ui), if it is missing.
# Quick when present; playwright's own browser download needs a CDN, so it is not used.
set -uo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || true
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "warning: chromium is not installed; tests/ui skip (and fail when CI=true)" >&2
fi
exit 0
