"""Packaging: the install step reruns only when its inputs change; the metadata is clean."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    lines = _dry_run(make_tree, "test").splitlines()

    # Match whole command lines: make prints the temporary directory ("/tmp/pytest-of-...").
    installs = [n for n, line in enumerate(lines) if "pip install" in line]
    test_runs = [n for n, line in enumerate(lines) if line.startswith(".venv/bin/pytest")]
    assert installs and test_runs and installs[0] < test_runs[0], lines


def test_license_metadata_is_an_spdx_expression_with_its_file():
    """A TOML-table license makes setuptools print a deprecation banner on every install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    assert project["license"] == "Apache-2.0"
    assert all((ROOT / name).is_file() for name in project["license-files"])


# --- components, locks and what each deployable imports ---------------------------------------

LOCK_COMPONENTS = {
    "functions": ("functions",),
    "runner": ("runner", "cpu"),
    "dev": ("dev",),
}
# Imported by code that runs in a co-located engine's own venv, not the runner's
# (gpu_runner/engines/facefusion_host.py runs inside FaceFusion's).
PEER_PACKAGES = {"facefusion"}
# Imported lazily by shared code on a path only another component takes, each for a reason.
NOT_RUN_BY: dict[str, dict[str, str]] = {
    "functions": {"av": "shared/media.check_video: only the runner fetches videos"},
    "runner": {},
}
# Declared although no module of ours imports them, each for a reason.
DECLARED_NOT_IMPORTED = {
    "sniffio": "httpcore imports it; declared so it is always there (see pyproject.toml)",
    "google-auth": "the Google clients' credentials; declared for its minimum version",
}


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _component_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """The base dependencies plus the extras, following self-references (comfyswap[...])."""
    project = _project()
    requirements = [Requirement(line) for line in project["dependencies"]]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in project["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == "comfyswap":
                pending.extend(requirement.extras)
            else:
                requirements.append(requirement)
    return requirements


def _lock_pins(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for each pin of a uv/pip-tools lock."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if pin:
            current = canonicalize_name(pin.group(1))
            pins[current] = (pin.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


@pytest.mark.parametrize("lock", sorted(LOCK_COMPONENTS))
def test_lock_pins_every_declared_requirement_with_hashes(lock):
    """A dependency added to pyproject.toml without `make lock` fails here, naming it."""
    pins = _lock_pins(ROOT / "requirements" / f"{lock}.txt")

    assert pins, "empty lock"
    assert all(hashes > 0 for _, hashes in pins.values()), "a pin without --hash"
    for requirement in _component_requirements(LOCK_COMPONENTS[lock]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements/{lock}.txt: run `make lock`"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements/{lock}.txt pins {name}=={version}, pyproject asks {requirement}: run `make lock`"
        )


@pytest.mark.parametrize("function", ["create_task", "get_task", "fetch_task"])
def test_each_function_deploys_the_functions_lock(function):
    lock = (ROOT / "requirements" / "functions.txt").read_text()

    deployed = (ROOT / "functions" / function / "requirements.txt").read_text()

    assert deployed.endswith(lock), f"functions/{function}/requirements.txt is stale: run `make lock`"


def _imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_file(name: str) -> Path | None:
    for candidate in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _third_party_imports(entry_points: list[Path]) -> set[str]:
    """Top-level third-party modules imported (at any depth, lazily or not) from the entry points."""
    seen: set[Path] = set()
    third_party: set[str] = set()
    pending = list(entry_points)
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports_of(path):
            top = name.split(".")[0]
            if top in {"shared", "gpu_runner", "comfyswap"}:
                parts = name.split(".")
                pending.extend(
                    found for i in range(1, len(parts) + 1) if (found := _module_file(".".join(parts[:i])))
                )
            elif top not in sys.stdlib_module_names and top not in PEER_PACKAGES and top != "__future__":
                third_party.add(name)
    return third_party


@functools.cache
def _module_owners() -> dict[str, frozenset[str]]:
    """Dotted module prefix (up to three levels) -> the installed distributions with files there."""
    owners: dict[str, set[str]] = {}
    for distribution in importlib.metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        for file in distribution.files or []:
            if file.suffix not in {".py", ".so", ".pyi"} or ".." in file.parts or ".dist-info" in str(file):
                continue
            parts = [*file.parts[:-1], file.name.split(".")[0]]
            if parts[-1] == "__init__":
                parts.pop()
            for depth in range(1, min(3, len(parts)) + 1):
                owners.setdefault(".".join(parts[:depth]), set()).add(name)
    return {module: frozenset(names) for module, names in owners.items()}


def _distributions(imports: set[str]) -> set[str]:
    """The distributions providing these modules; a namespace (google, google.cloud) names none."""
    owners = _module_owners()
    found: set[str] = set()
    for name in imports:
        parts = name.split(".")
        candidates = [owners.get(".".join(parts[:depth])) for depth in range(min(3, len(parts)), 0, -1)]
        known = [names for names in candidates if names]
        assert known, f"no installed distribution provides {name}"
        if len(known[0]) == 1:
            found.update(known[0])
    return found


def _python_files(*folders: str) -> list[Path]:
    return [path for folder in folders for path in (ROOT / folder).rglob("*.py")]


COMPONENT_ENTRY_POINTS = {
    # Each function's main.py (shared/ follows from its imports), and the bucket providers
    # the input store (shared/inputs.py) imports by name through the registry.
    "functions": lambda: [
        *sorted((ROOT / "functions").glob("*/main.py")),
        ROOT / "shared" / "storage" / "gcs.py",
        ROOT / "shared" / "storage" / "r2.py",
    ],
    # The whole runner package, and the storage providers its registry imports by name.
    "runner": lambda: _python_files("gpu_runner", "shared/storage"),
}


@pytest.mark.parametrize("lock", sorted(COMPONENT_ENTRY_POINTS))
def test_each_deployable_declares_what_it_imports_and_no_more(lock):
    imported = _distributions(_third_party_imports(COMPONENT_ENTRY_POINTS[lock]()))
    declared = {canonicalize_name(r.name) for r in _component_requirements(LOCK_COMPONENTS[lock])}
    pins = _lock_pins(ROOT / "requirements" / f"{lock}.txt")

    assert imported - set(pins) - set(NOT_RUN_BY[lock]) == set(), (
        f"imported but not in requirements/{lock}.txt"
    )
    # Pinned only because another package needs it is not enough: a module the code imports
    # itself is declared, or an upgrade of that other package can drop it.
    assert imported - declared - set(NOT_RUN_BY[lock]) == set(), (
        f"imported by {lock} but only a transitive dependency: declare it in pyproject.toml"
    )
    assert declared - imported - set(DECLARED_NOT_IMPORTED) == set(), f"declared for {lock}, never imported"
