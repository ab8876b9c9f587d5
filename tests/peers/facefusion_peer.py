"""The real FaceFusion 3.8.1 (installed by ``make peers`` into ``.tools/``) for the tests and
the benchmarks: where it is, whether it is installed, and a private copy of its folder
with a chosen set of model files (FaceFusion finds its models relative to its own folder).
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("FACEFUSION_TOOLS_DIR", REPO / ".tools"))
FACEFUSION_DIR = TOOLS / "facefusion" / "facefusion"
FACEFUSION_PYTHON = TOOLS / "facefusion-venv" / "bin" / "python"
MODELS_DIR = FACEFUSION_DIR / ".assets" / "models"
STAMP = TOOLS / "facefusion" / ".installed"


def installed() -> bool:
    return (
        STAMP.is_file()
        and FACEFUSION_PYTHON.is_file()
        and (FACEFUSION_DIR / "facefusion.py").is_file()
        and (MODELS_DIR / "inswapper_128_fp16.hash").is_file()
    )


def missing_reason() -> str:
    return f"the real FaceFusion is not installed in {TOOLS} (run `make peers`)"


def facefusion_command(root: Path = FACEFUSION_DIR) -> str:
    """FACEFUSION_COMMAND for the FaceFusion in ``root``."""
    return f"{shlex.quote(str(FACEFUSION_PYTHON))} {shlex.quote(str(root / 'facefusion.py'))}"


def private_root(base: Path, *, without: Iterable[str] = (), models_from: Path = MODELS_DIR) -> Path:
    """A FaceFusion folder of its own under ``base``: the installed package linked, its
    entry script copied (Python resolves a linked script to the original's folder, and
    FaceFusion would then use the original's models), and ``.assets/models`` holding links
    to every model file in ``models_from`` except the names in ``without`` (no
    ``.onnx``/``.hash``)."""
    root = base / "facefusion"
    models = root / ".assets" / "models"
    models.mkdir(parents=True)
    (root / "facefusion").symlink_to(FACEFUSION_DIR / "facefusion")
    shutil.copy2(FACEFUSION_DIR / "facefusion.py", root / "facefusion.py")
    shutil.copy2(FACEFUSION_DIR / "facefusion.ini", root / "facefusion.ini")
    left_out = set(without)
    for model_file in models_from.iterdir():
        if model_file.stem not in left_out:
            (models / model_file.name).symlink_to(model_file)
    return root
