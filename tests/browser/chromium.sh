#!/usr/bin/env bash
# Debian's Chromium for the `browser` tests (Playwright drives it; no browser download). Root + apt.
set -euo pipefail
if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
command -v chromium
