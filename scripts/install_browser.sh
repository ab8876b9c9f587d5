#!/usr/bin/env bash
# The headless browser the console tests drive (tests/console): Debian's chromium and
# chromium-driver. Browser downloads from other hosts (Selenium Manager, Chrome for
# Testing) are not reachable here, so the tests use these packages and nothing else.
# Idempotent: skipped once /usr/bin/chromedriver exists; waits for another apt run to finish.
set -euo pipefail
if [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq -o DPkg::Lock::Timeout=600
$SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=600 chromium chromium-driver
