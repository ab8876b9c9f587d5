"""Build each function's deployable folder: build/functions/<name>/ = main.py,
requirements.txt, .gcloudignore and a copy of shared/ (DESIGN.md §1).

Terraform zips each folder and names the object by the zip's md5, so a change redeploys.
Tests import the canonical shared/, never these copies.

Usage: python scripts/bundle_functions.py [--out build/functions]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ("create_task", "get_task", "fetch_task")
GCLOUDIGNORE = "__pycache__/\n*.pyc\n.gcloudignore\n"


def bundle(name: str, out_dir: Path) -> Path:
    source = ROOT / "functions" / name
    target = out_dir / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(source / "main.py", target / "main.py")
    shutil.copy2(source / "requirements.txt", target / "requirements.txt")
    shutil.copytree(ROOT / "shared", target / "shared", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (target / ".gcloudignore").write_text(GCLOUDIGNORE)
    return target


def folder_digest(folder: Path) -> str:
    """md5 over file names and contents, in a stable order (what the zip will hold)."""
    digest = hashlib.md5(usedforsecurity=False)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "functions")
    args = parser.parse_args(argv)
    for name in FUNCTIONS:
        folder = bundle(name, args.out)
        print(f"{name}: {folder} md5={folder_digest(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
