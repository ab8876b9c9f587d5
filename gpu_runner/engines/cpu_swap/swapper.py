"""FaceSwapper: find faces, prepare a source face once, swap it into images.

Thread safety: one FaceSwapper may be shared by threads. The three LiteRT
interpreters are each guarded by a lock (an interpreter holds its tensors in place);
everything else works on per-call arrays. Two threads therefore overlap in the warp and
blend (most of the time) and take turns on the models (4-5 ms a face).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from shared.errors import ValidationFailed

from .blend import blend_face
from .detection import FULL_RANGE, SHORT_RANGE, BlazeFaceDetector, Detection
from .errors import ModelsMissing, NoFaceInSource, NoFaceInTarget
from .landmarks import LandmarkModel, roi_from_detection, roi_from_landmarks
from .resolution import OutputSize, fit_within, resize_to
from .warp import FaceBox, delaunay_triangles, warp_face

if TYPE_CHECKING:
    from .video import VideoInfo

__all__ = ["DEFAULT_MODELS_DIR", "Face", "FaceSelector", "FaceSwapper", "SourceFace", "select_faces"]

FloatArray = npt.NDArray[np.float32]
ByteImage = npt.NDArray[np.uint8]
_Selectable = TypeVar("_Selectable")

#: "largest": the biggest face; "all": every face; an int: that face in size order (0 = largest).
FaceSelector = Literal["largest", "all"] | int

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent / "models"
LANDMARK_MODEL_FILE = "face_landmark.tflite"
# A short-range box under this fraction of the image's short side is a small face: the
# full-range model is run too, since short range misses faces that small.
_SMALL_FACE_FRACTION = 0.2
# Source faces are kept cropped to their box plus this fraction: the rest of the photo
# is never sampled, and a 12-megapixel source photo should not stay in memory.
_SOURCE_MARGIN_FRACTION = 0.15


@dataclasses.dataclass(frozen=True)
class Face:
    """A face found in an image: ``bbox`` (x_min, y_min, x_max, y_max), the detector's
    ``score`` and 468 ``landmarks`` (x, y) in the image's pixel coordinates."""

    bbox: FloatArray
    score: float
    landmarks: FloatArray

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


@dataclasses.dataclass(frozen=True)
class SourceFace:
    """A source face ready to be swapped in many times: a crop of the photo round the face,
    its landmarks in crop coordinates and the Delaunay triangles over them (computed once)."""

    image: ByteImage
    landmarks: FloatArray
    triangles: npt.NDArray[np.int32]


def select_faces(faces: list[_Selectable], face_selector: FaceSelector) -> list[_Selectable]:
    """The faces (or detections) ``face_selector`` names among ``faces``, which are sorted
    largest first; raises NoFaceInTarget when it names none."""
    if not faces:
        raise NoFaceInTarget()
    if face_selector == "all":
        return faces
    if face_selector == "largest":
        return faces[:1]
    if isinstance(face_selector, int) and not isinstance(face_selector, bool):
        if 0 <= face_selector < len(faces):
            return [faces[face_selector]]
        raise NoFaceInTarget(
            f"face {face_selector} was requested but the target has {len(faces)} face(s) (0 is the largest)",
            details={"face_selector": face_selector, "faces_found": len(faces)},
        )
    raise ValidationFailed(
        "face_selector", f"expected 'largest', 'all' or a face index (0 = largest), not {face_selector!r}"
    )


class FaceSwapper:
    """The classical CPU face swap. Loads the three models once; reuse one instance."""

    def __init__(self, models_dir: Path = DEFAULT_MODELS_DIR, *, num_threads: int = 1) -> None:
        paths = {
            name: models_dir / name
            for name in (SHORT_RANGE.model_file, FULL_RANGE.model_file, LANDMARK_MODEL_FILE)
        }
        missing = sorted(name for name, path in paths.items() if not path.is_file())
        if missing:
            raise ModelsMissing(
                f"face models missing from {models_dir}: {', '.join(missing)}; "
                "run `python scripts/fetch_models.py` at install time",
                details={"models_dir": str(models_dir), "missing": missing},
            )
        self._short_range = BlazeFaceDetector(
            paths[SHORT_RANGE.model_file], SHORT_RANGE, num_threads=num_threads
        )
        self._full_range = BlazeFaceDetector(
            paths[FULL_RANGE.model_file], FULL_RANGE, num_threads=num_threads
        )
        self._landmarks = LandmarkModel(paths[LANDMARK_MODEL_FILE], num_threads=num_threads)

    def detect_boxes(self, image_bgr: ByteImage, *, thorough: bool = False) -> list[Detection]:
        """Face boxes, largest first. Short range first; full range too when it found
        nothing, only small faces, or ``thorough`` (every face counts, e.g. "all")."""
        detections = self._short_range.detect(image_bgr)
        short_side = min(image_bgr.shape[:2])
        small_only = all(
            max(d.box[2] - d.box[0], d.box[3] - d.box[1]) < _SMALL_FACE_FRACTION * short_side
            for d in detections
        )
        if thorough or small_only:
            detections = _merge_detections(detections, self._full_range.detect(image_bgr))
        return sorted(detections, key=lambda detection: detection.area, reverse=True)

    def landmarks_for(self, image_bgr: ByteImage, detection: Detection) -> FloatArray | None:
        """468 landmarks for one detected face, refined by a second pass from a crop built on
        the first pass's points; None when the landmark model rejects the crop."""
        first = self._landmarks.run(image_bgr, roi_from_detection(detection.box, detection.keypoints))
        if first is None:
            return None
        return self.track_landmarks(image_bgr, first.points)

    def track_landmarks(self, image_bgr: ByteImage, previous_points: FloatArray) -> FloatArray | None:
        """Landmarks from a crop round ``previous_points`` (the last frame's, or a first pass)."""
        result = self._landmarks.run(image_bgr, roi_from_landmarks(previous_points))
        return None if result is None else result.points

    def detect_faces(self, image_bgr: ByteImage, *, thorough: bool = False) -> list[Face]:
        """Every face with landmarks, largest first."""
        faces = []
        for detection in self.detect_boxes(image_bgr, thorough=thorough):
            points = self.landmarks_for(image_bgr, detection)
            if points is not None:
                faces.append(Face(detection.box, detection.score, points))
        return faces

    def prepare_source(self, image_bgr: ByteImage) -> SourceFace:
        """The largest face of ``image_bgr`` as a SourceFace; NoFaceInSource when there is none."""
        _check_image(image_bgr, "source")
        faces = self.detect_faces(image_bgr)
        if not faces:
            raise NoFaceInSource()
        face = faces[0]
        margin = int(_SOURCE_MARGIN_FRACTION * max(np.ptp(face.landmarks, axis=0))) + 2
        box = FaceBox.around(face.landmarks, image_bgr.shape, margin)
        crop = np.ascontiguousarray(image_bgr[box.y0 : box.y1, box.x0 : box.x1])
        landmarks = (face.landmarks - np.array([box.x0, box.y0], dtype=np.float32)).astype(np.float32)
        return SourceFace(crop, landmarks, delaunay_triangles(landmarks))

    def swap_faces(self, source: SourceFace, target_bgr: ByteImage, faces: list[Face]) -> ByteImage:
        """A copy of ``target_bgr`` with ``source`` swapped onto each of ``faces``."""
        result = target_bgr.copy()
        for face in faces:
            self.swap_onto(source, result, face.landmarks)
        return result

    def swap_onto(self, source: SourceFace, image_bgr: ByteImage, target_landmarks: FloatArray) -> FaceBox:
        """Swap ``source`` onto the face at ``target_landmarks`` of ``image_bgr``, in place;
        returns the box outside which no pixel changed."""
        warped = warp_face(
            source.image, source.landmarks, source.triangles, target_landmarks, image_bgr.shape
        )
        blend_face(image_bgr, target_landmarks, warped)
        return warped.box

    def swap_image(
        self,
        source: SourceFace,
        target_bgr: ByteImage,
        face_selector: FaceSelector = "largest",
        *,
        output_size: OutputSize | None = None,
    ) -> ByteImage:
        """The target with the source face swapped in, at the target's size or fitted into
        ``output_size`` (see resolution.py); NoFaceInTarget when the selector finds no face."""
        _check_image(target_bgr, "target")
        target = resize_to(target_bgr, fit_within(target_bgr.shape[1], target_bgr.shape[0], output_size))
        faces = select_faces(self.detect_faces(target, thorough=face_selector != "largest"), face_selector)
        return self.swap_faces(source, target, faces)

    def swap_video(
        self,
        source: SourceFace,
        target_path: Path,
        output_path: Path,
        *,
        face_selector: FaceSelector = "largest",
        output_size: OutputSize | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> VideoInfo:
        """See video.swap_video: a streaming H.264 MP4 swap that keeps timing and audio."""
        from .video import swap_video  # a cycle otherwise: video imports this module

        return swap_video(
            self,
            source,
            target_path,
            output_path,
            face_selector=face_selector,
            output_size=output_size,
            progress=progress,
            should_stop=should_stop,
        )


def _check_image(image: ByteImage, role: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"the {role} image must be a BGR uint8 array (H, W, 3), got {image.dtype} {image.shape}"
        )


def _merge_detections(
    first: list[Detection], second: list[Detection], iou_threshold: float = 0.3
) -> list[Detection]:
    """``first`` plus each ``second`` detection that overlaps none of them."""
    merged = list(first)
    for candidate in second:
        if all(_iou(candidate.box, kept.box) <= iou_threshold for kept in merged):
            merged.append(candidate)
    return merged


def _iou(box_a: FloatArray, box_b: FloatArray) -> float:
    width = min(box_a[2], box_b[2]) - max(box_a[0], box_b[0])
    height = min(box_a[3], box_b[3]) - max(box_a[1], box_b[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = float(width * height)
    area_a = float((box_a[2] - box_a[0]) * (box_a[3] - box_a[1]))
    area_b = float((box_b[2] - box_b[0]) * (box_b[3] - box_b[1]))
    return intersection / (area_a + area_b - intersection)
