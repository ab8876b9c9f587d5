"""Errors of the CPU face swap, placed in the service's one exception tree (shared.errors).

ComfySwapError
├── JobFailed
│   ├── NoFaceInSource     the source image shows no usable face: send another photo
│   ├── NoFaceInTarget     the target image (or requested face) has none: nothing to swap
│   └── UnreadableMedia    the target video cannot be decoded
├── SwapCancelled          should_stop() said stop; the partial output was removed
└── ModelsMissing          an install problem: run scripts/fetch_models.py
"""

from __future__ import annotations

from typing import Any

from shared.errors import ComfySwapError, JobFailed

__all__ = ["ModelsMissing", "NoFaceInSource", "NoFaceInTarget", "SwapCancelled", "UnreadableMedia"]


class NoFaceInSource(JobFailed):
    """The source photo yields no face: the job cannot succeed with it."""

    default_code = "no_face_in_source"

    def __init__(
        self,
        message: str = "no face was found in the source image; use a clear, frontal photo of one face",
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)


class NoFaceInTarget(JobFailed):
    """The target has no face (or not the one the face selector asked for)."""

    default_code = "no_face_in_target"

    def __init__(self, message: str = "no face was found in the target image", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class UnreadableMedia(JobFailed):
    """The target video has no video stream or cannot be decoded."""

    default_code = "unreadable_media"


class SwapCancelled(ComfySwapError):  # named like the tree's other leaves (JobFailed)
    """The caller asked to stop between frames; the task is CANCELLED, not FAILED."""

    http_status = 409
    default_code = "cancelled"

    def __init__(self, message: str = "the face swap was cancelled", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class ModelsMissing(ComfySwapError):  # named like the tree's other leaves (JobFailed)
    """A model file is absent: the install skipped ``python scripts/fetch_models.py``."""

    default_code = "models_missing"
