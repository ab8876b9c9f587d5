"""The 468-point MediaPipe Face Mesh landmark model, run on a rotated square face crop.

The model was trained on upright square crops 1.5x the face box, so the crop is
rotated to make the eyes level (MediaPipe's ``DetectionsToRects`` +
``RectTransformation``). A crop from a detection box is coarse; a second pass from
a crop built around the first pass's landmarks (MediaPipe's tracking ROI) gives the
steadier points the warp needs.

Coordinates: everything returned is in pixel-index coordinates of the full image
(pixel centres at integers, OpenCV's convention).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from ai_edge_litert.interpreter import Interpreter

__all__ = [
    "INNER_LIPS",
    "LandmarkModel",
    "LandmarkResult",
    "RotatedRoi",
    "roi_from_detection",
    "roi_from_landmarks",
]

FloatArray = npt.NDArray[np.float32]

LANDMARK_COUNT = 468
ROI_SCALE = 1.5
# Outer eye corners, the rotation reference of MediaPipe's landmark-based ROI.
_RIGHT_EYE_OUTER, _LEFT_EYE_OUTER = 33, 263
# Inner lip contour, in order round the mouth opening: cut out of the mask so the
# target's own teeth and tongue stay.
INNER_LIPS: tuple[int, ...] = (
    78,
    95,
    88,
    178,
    87,
    14,
    317,
    402,
    318,
    324,
    308,
    415,
    310,
    311,
    312,
    13,
    82,
    81,
    80,
    191,
)


@dataclasses.dataclass(frozen=True)
class RotatedRoi:
    """A square crop: centre and side in continuous pixel coordinates, rotation in radians
    (the angle of the eye line in the image, y down)."""

    centre_x: float
    centre_y: float
    side: float
    rotation: float

    def crop_to_image(self, crop_size: int) -> npt.NDArray[np.float64]:
        """2x3 affine from crop coordinates (continuous) to image coordinates (continuous)."""
        scale = self.side / crop_size
        cos, sin = math.cos(self.rotation) * scale, math.sin(self.rotation) * scale
        half = crop_size / 2
        return np.array(
            [
                [cos, -sin, self.centre_x - cos * half + sin * half],
                [sin, cos, self.centre_y - sin * half - cos * half],
            ]
        )


@dataclasses.dataclass(frozen=True)
class LandmarkResult:
    points: FloatArray  # (468, 2) pixel-index coordinates of the full image
    score: float


def _square_roi(box_min: FloatArray, box_max: FloatArray, eye_a: FloatArray, eye_b: FloatArray) -> RotatedRoi:
    # Inputs are pixel-index coordinates; the ROI is continuous (+0.5).
    centre = (box_min + box_max) / 2 + 0.5
    side = float(max(box_max - box_min)) * ROI_SCALE
    rotation = math.atan2(float(eye_b[1] - eye_a[1]), float(eye_b[0] - eye_a[0]))
    return RotatedRoi(float(centre[0]), float(centre[1]), side, rotation)


def roi_from_detection(box: FloatArray, keypoints: FloatArray) -> RotatedRoi:
    """MediaPipe's ROI from a detection: the box, squared on its long side, x1.5, eyes level."""
    return _square_roi(box[:2], box[2:], keypoints[0], keypoints[1])


def roi_from_landmarks(points: FloatArray) -> RotatedRoi:
    """MediaPipe's tracking ROI: the landmarks' box in the face's own frame, x1.5, eyes level.

    The box is taken after rotating the points upright, so a tilted face does not get
    an inflated crop.
    """
    eye_a, eye_b = points[_RIGHT_EYE_OUTER], points[_LEFT_EYE_OUTER]
    rotation = math.atan2(float(eye_b[1] - eye_a[1]), float(eye_b[0] - eye_a[0]))
    cos, sin = math.cos(rotation), math.sin(rotation)
    upright = points @ np.array([[cos, -sin], [sin, cos]], dtype=np.float32)
    low, high = upright.min(axis=0), upright.max(axis=0)
    centre_upright = (low + high) / 2
    centre = np.array(
        [cos * centre_upright[0] - sin * centre_upright[1], sin * centre_upright[0] + cos * centre_upright[1]]
    )
    side = float(max(high - low)) * ROI_SCALE
    return RotatedRoi(float(centre[0]) + 0.5, float(centre[1]) + 0.5, side, rotation)


class LandmarkModel:
    """The Face Mesh model (192x192 RGB in [0, 1] -> 468 x (x, y, z) and a face logit).

    A lock serialises ``invoke``: a LiteRT interpreter is not safe to share between threads.
    """

    def __init__(self, model_path: Path, *, num_threads: int = 1, min_score: float = 0.5) -> None:
        self._interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
        self._interpreter.allocate_tensors()
        input_details = self._interpreter.get_input_details()[0]
        self._input_index = int(input_details["index"])
        self.input_size = int(input_details["shape"][1])
        outputs = {int(np.prod(d["shape"])): int(d["index"]) for d in self._interpreter.get_output_details()}
        self._points_index = outputs[LANDMARK_COUNT * 3]
        self._score_index = outputs[1]
        self.min_score = min_score
        self._lock = threading.Lock()

    def run(self, image_bgr: npt.NDArray[np.uint8], roi: RotatedRoi) -> LandmarkResult | None:
        """Landmarks of the face in ``roi``, or None when the model says there is no face."""
        size = self.input_size
        crop_to_image = roi.crop_to_image(size)
        # warpAffine samples at pixel indices: shift both sides by half a pixel.
        index_map = crop_to_image.copy()
        index_map[:, 2] += crop_to_image[:, :2].sum(axis=1) * 0.5 - 0.5
        crop = cv2.warpAffine(
            image_bgr,
            index_map,
            (size, size),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
        )
        tensor = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32) * (1.0 / 255.0)
        with self._lock:
            self._interpreter.set_tensor(self._input_index, tensor[np.newaxis])
            self._interpreter.invoke()
            raw_points = self._interpreter.get_tensor(self._points_index).reshape(LANDMARK_COUNT, 3)
            raw_score = float(self._interpreter.get_tensor(self._score_index).reshape(-1)[0])
        score = 1.0 / (1.0 + math.exp(-max(-80.0, min(80.0, raw_score))))
        if score < self.min_score:
            return None
        crop_points = raw_points[:, :2].astype(np.float64)
        image_points = crop_points @ crop_to_image[:, :2].T + crop_to_image[:, 2] - 0.5
        return LandmarkResult(image_points.astype(np.float32), score)
