"""BlazeFace face detection (MediaPipe short- and full-range models) run with LiteRT.

The models predict, for every anchor of a fixed SSD grid, a score logit and 16 numbers:
box centre offset, box size and six keypoints (eyes, nose, mouth, ear tragions), in
input-tensor pixels relative to the anchor centre. Decoding follows MediaPipe's
``TensorsToDetectionsCalculator`` (fixed anchor size, scale = input size) and the
overlapping boxes are merged by MediaPipe's weighted non-maximum suppression, which
averages the cluster instead of keeping one box, so the box is steadier across frames.

The short-range model (128 px input) suits faces that fill a good part of the frame;
the full-range model (192 px, one dense stride-4 grid) finds faces down to a few
percent of the frame, which is what group photos and wide video shots need.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from ai_edge_litert.interpreter import Interpreter

__all__ = ["FULL_RANGE", "SHORT_RANGE", "BlazeFaceDetector", "BlazeFaceSpec", "Detection"]

FloatArray = npt.NDArray[np.float32]

# MediaPipe clamps logits at +-100; 80 keeps exp() finite in float32.
_RAW_SCORE_LIMIT = 80.0


@dataclasses.dataclass(frozen=True)
class BlazeFaceSpec:
    """One BlazeFace variant: its file, square input size and SSD anchor layout.

    ``anchor_layers`` lists (stride, anchors per grid cell); MediaPipe's anchor
    calculator stacks layers of equal stride into one grid with more anchors per cell.
    """

    model_file: str
    input_size: int
    anchor_layers: tuple[tuple[int, int], ...]
    min_score: float = 0.5
    nms_iou: float = 0.3


SHORT_RANGE = BlazeFaceSpec("face_detection_short_range.tflite", 128, ((8, 2), (16, 6)))
FULL_RANGE = BlazeFaceSpec("face_detection_full_range.tflite", 192, ((4, 1),), min_score=0.6)


@dataclasses.dataclass(frozen=True)
class Detection:
    """A detected face in pixel coordinates of the image given to ``detect``.

    ``box`` is (x_min, y_min, x_max, y_max); ``keypoints`` is 6x2: right eye, left eye
    (as seen in the image: the first one is on the left), nose tip, mouth centre,
    right and left ear tragion.
    """

    box: FloatArray
    score: float
    keypoints: FloatArray

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


def generate_anchors(spec: BlazeFaceSpec) -> FloatArray:
    """Anchor centres (N, 2), normalised to [0, 1], in the order the model emits them."""
    centres: list[FloatArray] = []
    for stride, per_cell in spec.anchor_layers:
        cells = spec.input_size // stride
        grid = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        xs, ys = np.meshgrid(grid, grid)
        layer = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(layer, per_cell, axis=0))
    return np.concatenate(centres, axis=0).astype(np.float32)


def _iou_one_to_many(box: FloatArray, boxes: FloatArray) -> FloatArray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    intersection = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1e-9), 0.0).astype(np.float32)


def weighted_nms(
    boxes: FloatArray, keypoints: FloatArray, scores: FloatArray, iou_threshold: float
) -> list[Detection]:
    """MediaPipe's weighted NMS: each cluster becomes its score-weighted mean box and keypoints,
    scored by its best member."""
    order = np.argsort(-scores)
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    remaining = np.ones(len(scores), dtype=bool)
    detections: list[Detection] = []
    for index in range(len(scores)):
        if not remaining[index]:
            continue
        overlaps = _iou_one_to_many(boxes[index], boxes) > iou_threshold
        cluster = np.flatnonzero(remaining & overlaps)
        cluster = np.union1d(cluster, [index])
        weights = scores[cluster] / scores[cluster].sum()
        box = (boxes[cluster] * weights[:, None]).sum(axis=0)
        points = (keypoints[cluster] * weights[:, None, None]).sum(axis=0)
        detections.append(Detection(box.astype(np.float32), float(scores[index]), points.astype(np.float32)))
        remaining[cluster] = False
    return detections


class BlazeFaceDetector:
    """One BlazeFace model. Not thread-safe on its own: LiteRT interpreters keep their
    tensors in place, so ``detect`` serialises calls with a lock."""

    def __init__(self, model_path: Path, spec: BlazeFaceSpec, *, num_threads: int = 1) -> None:
        self.spec = spec
        self._interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
        self._interpreter.allocate_tensors()
        self._input_index = int(self._interpreter.get_input_details()[0]["index"])
        outputs = {int(d["shape"][-1]): int(d["index"]) for d in self._interpreter.get_output_details()}
        self._regressor_index = outputs[16]
        self._score_index = outputs[1]
        self._anchors = generate_anchors(spec)
        self._lock = threading.Lock()

    def detect(self, image_bgr: npt.NDArray[np.uint8]) -> list[Detection]:
        """Faces in ``image_bgr`` (any size), in its pixel coordinates, best score first."""
        size = self.spec.input_size
        height, width = image_bgr.shape[:2]
        # Letterbox (keep the aspect ratio, pad black) as MediaPipe does: stretching would
        # squash faces into shapes the model never saw.
        scale = size / max(height, width)
        resized_w, resized_h = max(1, round(width * scale)), max(1, round(height * scale))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(image_bgr, (resized_w, resized_h), interpolation=interpolation)
        pad_x, pad_y = (size - resized_w) // 2, (size - resized_h) // 2
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        canvas[pad_y : pad_y + resized_h, pad_x : pad_x + resized_w] = resized
        tensor = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).astype(np.float32) * (2.0 / 255.0) - 1.0

        with self._lock:
            self._interpreter.set_tensor(self._input_index, tensor[np.newaxis])
            self._interpreter.invoke()
            raw_boxes = self._interpreter.get_tensor(self._regressor_index)[0].astype(np.float32)
            raw_scores = self._interpreter.get_tensor(self._score_index)[0, :, 0].astype(np.float32)

        logits = np.clip(raw_scores, -_RAW_SCORE_LIMIT, _RAW_SCORE_LIMIT)
        scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        keep = scores >= self.spec.min_score
        if not keep.any():
            return []
        raw_boxes, scores, anchors = raw_boxes[keep] / size, scores[keep], self._anchors[keep]
        centres = raw_boxes[:, 0:2] + anchors
        half_sizes = raw_boxes[:, 2:4] / 2
        boxes = np.concatenate([centres - half_sizes, centres + half_sizes], axis=1)
        keypoints = raw_boxes[:, 4:16].reshape(-1, 6, 2) + anchors[:, None, :]
        valid = (half_sizes > 0).all(axis=1)
        merged = weighted_nms(boxes[valid], keypoints[valid], scores[valid], self.spec.nms_iou)

        # Tensor coordinates (normalised, continuous) -> image pixel-index coordinates.
        offset = np.array([pad_x, pad_y], dtype=np.float32)
        detections = []
        for detection in merged:
            box = ((detection.box.reshape(2, 2) * size - offset) / scale - 0.5).reshape(4)
            points = (detection.keypoints * size - offset) / scale - 0.5
            box = np.clip(box, -0.5, [width - 0.5, height - 0.5, width - 0.5, height - 0.5])
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            detections.append(Detection(box.astype(np.float32), detection.score, points.astype(np.float32)))
        return detections
