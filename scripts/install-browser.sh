#!/usr/bin/env bash
# Installs Debian's chromium for the dashboard's end-to-end browser test.
# Browser downloads by test tools are blocked on these machines, so the test drives
# the system chromium with Playwright's Python client (no bundled browser needed).
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ] && ! command -v sudo >/dev/null 2>&1; then
  echo "install-browser: not root; the browser test will be skipped (apt-get install chromium to run it)"
  exit 0
fi
SUDO=""; [ "$(id -u)" != "0" ] && SUDO="sudo"
echo "install-browser: installing Debian chromium (once)..."
$SUDO apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
  || echo "install-browser: apt-get install chromium failed; the browser test will be skipped"
exit 0
