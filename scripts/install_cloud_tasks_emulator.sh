#!/usr/bin/env bash
# Install the Cloud Tasks emulator (PyPI gcloud-tasks-emulator) into its own virtualenv
# (.tools/cloud-tasks-emulator-venv).
#
# Why a separate venv: gcloud-tasks-emulator 0.6.2 pins protobuf < 5 while the project's
# google-cloud-firestore needs protobuf >= 6; in one venv pip silently picks an older
# emulator and downgrades the clients. Idempotent (scripts/install_tool_venv.sh).
#
# Usage: scripts/install_cloud_tasks_emulator.sh   (from anywhere; paths are relative to the repo)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/install_tool_venv.sh"
install_tool_venv gcloud-tasks-emulator "${CLOUD_TASKS_EMULATOR_VERSION:-0.6.2}" cloud-tasks-emulator-venv gcloud-tasks-emulator
