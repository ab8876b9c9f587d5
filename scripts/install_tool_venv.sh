# Sourced (not run) by the scripts that install a test tool from PyPI into a virtualenv
# of its own under .tools/ (install_checkov.sh, install_cloud_tasks_emulator.sh): the
# tools whose pins clash with the project's venv. Idempotent: a venv that already has
# the pinned version is left alone.
#
# install_tool_venv PACKAGE VERSION VENV_NAME ENTRY_POINT
#   installs PACKAGE==VERSION into .tools/VENV_NAME and fails here, not in the tests,
#   if .tools/VENV_NAME/bin/ENTRY_POINT cannot start (a broken pin).
install_tool_venv() {
  local package="$1" version="$2" venv_name="$3" entry_point="$4"
  local python="${PYTHON:-python3.11}"
  command -v "$python" >/dev/null 2>&1 || python=python3
  local repo_root venv
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$repo_root/.tools/$venv_name"

  if [ -x "$venv/bin/$entry_point" ] && [ "$(_tool_venv_version "$venv" "$package")" = "$version" ]; then
    echo "$package $version already installed in $venv"
    return 0
  fi

  mkdir -p "$repo_root/.tools"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$package==$version"
  "$venv/bin/$entry_point" --help >/dev/null
  echo "installed $package $(_tool_venv_version "$venv" "$package") in $venv"
}

_tool_venv_version() {
  "$1/bin/python" -m pip show --disable-pip-version-check "$2" 2>/dev/null | sed -n 's/^Version: //p'
}
