#!/usr/bin/env bash
# Tools the tests need that must not share the project's virtualenv (their pins clash
# with the Google clients): the Cloud Tasks emulator and checkov; and Debian's chromium for the
# console's browser tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in scripts/install_cloud_tasks_emulator.sh scripts/install_checkov.sh scripts/install_browser.sh; do
  if [ -f "$script" ]; then bash "$script"; fi
done
