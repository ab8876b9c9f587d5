"""Packaging: the install step reruns only when its inputs change; the metadata is clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def make_tree(tmp_path):
    """A copy of the Makefile with its install inputs, and a venv whose python is a stand-in."""
    shutil.copy2(ROOT / "Makefile", tmp_path / "Makefile")
    requirement_files = [path.relative_to(ROOT).as_posix() for path in ROOT.glob("requirements/*.txt")]
    for relative in ["pyproject.toml", *requirement_files]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, tmp_path / relative)
    (tmp_path / "scripts").mkdir(exist_ok=True)
    for script in ROOT.glob("scripts/*"):
        if script.is_file():
            shutil.copy2(script, tmp_path / "scripts" / script.name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    return tmp_path


def _dry_run(tree: Path, target: str) -> str:
    result = subprocess.run(
        ["make", "-n", target], cwd=tree, capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout


def _age_inputs(tree: Path, seconds_ago: float) -> None:
    stamp_time = (tree / ".venv" / ".installed").stat().st_mtime
    for path in tree.rglob("*"):
        if path.is_file() and ".venv" not in path.parts:
            os.utime(path, (stamp_time - seconds_ago, stamp_time - seconds_ago))


def test_second_make_run_installs_nothing(make_tree):
    (make_tree / ".venv" / ".installed").touch()
    _age_inputs(make_tree, 60)

    commands = _dry_run(make_tree, "run")

    assert "pip install" not in commands and "fetch_models" not in commands, commands
    assert "comfyswap run" in commands


def test_make_run_installs_again_when_pyproject_changes(make_tree):
    (make_tree / ".venv" / ".installed").touch()
    _age_inputs(make_tree, 60)
    stamp_time = (make_tree / ".venv" / ".installed").stat().st_mtime
    os.utime(make_tree / "pyproject.toml", (stamp_time + 5, stamp_time + 5))  # edited after the install

    commands = _dry_run(make_tree, "run")

    assert "pip install" in commands, commands


def test_fresh_clone_make_test_installs_first(make_tree):
    commands = _dry_run(make_tree, "test")

    assert commands.index("pip install") < commands.index("pytest"), commands


def test_license_metadata_is_an_spdx_expression_with_its_file():
    """A TOML-table license makes setuptools print a deprecation banner on every install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    assert project["license"] == "Apache-2.0"
    assert all((ROOT / name).is_file() for name in project["license-files"])
