"""Generate the hashed requirement locks from pyproject.toml (``make lock``).

One lock per deployable, each from the components it runs:

    requirements/functions.txt  base + functions       (copied to functions/<name>/requirements.txt)
    requirements/runner.txt     base + runner + cpu    (gpu_runner/Dockerfile)
    requirements/dev.txt        base + every extra     (make install)

Every line is pinned with its sha256 hashes, so pip installs in hash-checking mode and a
changed file on the index fails the install instead of shipping. The target is the
deployables' platform (CPython 3.11 on x86_64 Linux, glibc 2.28 or newer), whatever
machine runs this script. uv resolves against PyPI only.

Usage: python scripts/lock.py [--check]   (--check: exit 1 if a lock is out of date)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ("create_task", "get_task", "fetch_task")
LOCKS: dict[str, tuple[str, ...]] = {
    "functions": ("functions",),
    "runner": ("runner", "cpu"),
    "dev": ("dev",),
}
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
FUNCTION_HEADER = (
    "# Deployed with shared/ copied beside main.py by `make bundle`.\n"
    "# A copy of requirements/functions.txt (the functions' lock, `make lock`); do not edit.\n"
)


def uv_binary() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise SystemExit("lock: uv is not installed (it is in the dev extra: make install)")
    return found


def compile_lock(extras: tuple[str, ...], output: Path) -> None:
    command = [
        uv_binary(),
        "pip",
        "compile",
        "pyproject.toml",
        "--quiet",
        "--generate-hashes",
        "--python-version",
        PYTHON_VERSION,
        "--python-platform",
        PYTHON_PLATFORM,
        "--index-url",
        "https://pypi.org/simple",
        "--no-config",
        "--custom-compile-command",
        "make lock",
        "--output-file",
        str(output),
    ]
    for extra in extras:
        command += ["--extra", extra]
    subprocess.run(command, cwd=ROOT, check=True)


def function_requirements(functions_lock: str) -> str:
    return FUNCTION_HEADER + functions_lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed locks; write nothing"
    )
    args = parser.parse_args(argv)
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, extras in LOCKS.items():
            target = ROOT / "requirements" / f"{name}.txt"
            fresh = Path(scratch) / f"{name}.txt"
            if target.exists():
                shutil.copy2(target, fresh)  # uv keeps the existing pins it can (no needless upgrades)
            compile_lock(extras, fresh)
            if args.check:
                if not target.exists() or target.read_text() != fresh.read_text():
                    stale.append(str(target.relative_to(ROOT)))
            else:
                target.parent.mkdir(exist_ok=True)
                shutil.copy2(fresh, target)
    functions_lock = (ROOT / "requirements" / "functions.txt").read_text()
    for function in FUNCTIONS:
        path = ROOT / "functions" / function / "requirements.txt"
        if args.check:
            if path.read_text() != function_requirements(functions_lock):
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(function_requirements(functions_lock))
    if stale:
        print(f"lock: out of date: {', '.join(stale)} (run `make lock`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
