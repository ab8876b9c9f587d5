#!/usr/bin/env bash
# Install checkov into its own virtualenv (.tools/checkov-venv).
#
# Why a separate venv: checkov depends on bc-python-hcl2, which installs a package
# named `hcl2` over python-hcl2's, and the project's Terraform tests need the real
# python-hcl2. Idempotent (scripts/install_tool_venv.sh).
#
# Usage: scripts/install_checkov.sh   (from anywhere; paths are relative to the repo)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/install_tool_venv.sh"
install_tool_venv checkov "${CHECKOV_VERSION:-3.3.30}" checkov-venv checkov
