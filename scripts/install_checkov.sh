#!/usr/bin/env bash
# Install checkov into its own virtualenv (.tools/checkov-venv).
#
# Why a separate venv: checkov depends on bc-python-hcl2, which installs a package
# named `hcl2` over python-hcl2's, and the project's Terraform tests need the real
# python-hcl2. Idempotent: a venv that already has the pinned version is left alone.
#
# Usage: scripts/install_checkov.sh   (from anywhere; paths are relative to the repo)
set -euo pipefail

CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.tools/checkov-venv"

if [ -x "$venv/bin/checkov" ] && "$venv/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
  echo "checkov $CHECKOV_VERSION already installed in $venv"
  exit 0
fi

mkdir -p "$repo_root/.tools"
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
echo "installed checkov $("$venv/bin/checkov" --version) in $venv"
