#!/usr/bin/env bash
# Install the Cloud Tasks emulator (PyPI gcloud-tasks-emulator) into its own virtualenv
# (.tools/cloud-tasks-emulator-venv).
#
# Why a separate venv: gcloud-tasks-emulator 0.6.2 pins protobuf < 5 while the project's
# google-cloud-firestore needs protobuf >= 6; in one venv pip silently picks an older
# emulator and downgrades the clients. Idempotent: a venv that already has the pinned
# version is left alone.
#
# Usage: scripts/install_cloud_tasks_emulator.sh   (from anywhere; paths are relative to the repo)
set -euo pipefail

EMULATOR_VERSION="${CLOUD_TASKS_EMULATOR_VERSION:-0.6.2}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.tools/cloud-tasks-emulator-venv"

installed_version() {
  "$venv/bin/python" -m pip show gcloud-tasks-emulator 2>/dev/null | sed -n 's/^Version: //p'
}

if [ -x "$venv/bin/gcloud-tasks-emulator" ] && [ "$(installed_version)" = "$EMULATOR_VERSION" ]; then
  echo "gcloud-tasks-emulator $EMULATOR_VERSION already installed in $venv"
  exit 0
fi

mkdir -p "$repo_root/.tools"
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "gcloud-tasks-emulator==$EMULATOR_VERSION"
# Fail here, not in the tests, if the entry point cannot start (a broken protobuf pin).
"$venv/bin/gcloud-tasks-emulator" --help >/dev/null
echo "installed gcloud-tasks-emulator $(installed_version) in $venv"
