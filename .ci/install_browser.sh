#!/usr/bin/env bash
# Install Debian's chromium for the browser test (tests/test_browser.py, marker `browser`).
# Idempotent: does nothing when /usr/bin/chromium already exists. Never uses `playwright install`.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -y
$SUDO apt-get install -y --no-install-recommends chromium
/usr/bin/chromium --version || true
