#!/usr/bin/env bash
# Installs Debian's chromium for the dashboard's end-to-end browser test.
# Browser downloads by test tools are blocked on these machines, so the test drives
# the system chromium with Playwright's Python client (no bundled browser needed).
#
# Exit status: 0 when chromium is there (already, or installed now), and when it cannot be
# installed here (not root and no password-less sudo, or no apt-get: tests/app/test_browser.py then skips,
# saying why); 1 when it should have been installed (root or password-less sudo, and apt-get) and was not
# (the browser test then fails rather than skips).
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
# sudo counts only when it needs no password (-n): a prompt would stall `make test`.
if [ "$(id -u)" != "0" ] && ! sudo -n true >/dev/null 2>&1; then
  echo "install-browser: not root and no password-less sudo: chromium not installed; the browser test will be skipped (apt-get install chromium to run it)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get: chromium not installed; the browser test will be skipped (install chromium at /usr/bin/chromium to run it)"
  exit 0
fi
SUDO=""; [ "$(id -u)" != "0" ] && SUDO="sudo -n"
echo "install-browser: installing Debian chromium (once)..."
log=$(mktemp)
$SUDO apt-get update -qq >"$log" 2>&1 || echo "install-browser: apt-get update failed (trying the install anyway)"
if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >>"$log" 2>&1 || [ ! -x /usr/bin/chromium ]; then
  echo "install-browser: apt-get install chromium failed (no /usr/bin/chromium); the browser test will fail. apt-get said:" >&2
  tail -n 5 "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
echo "install-browser: chromium installed at /usr/bin/chromium"
