"""What a face swap's ``resolution`` ("1024x1024") means here, and the resize it implies.

The seed API calls ``resolution`` the output resolution. A swap must never distort the
target (a face stretched to a square box reads as a different face and breaks the
landmark model), and upscaling adds pixels but no detail while costing time. So:

* ``resolution="WxH"`` is a bounding box: the output keeps the target's aspect ratio,
  fits inside W x H, and is never larger than the target (no upscaling).
* The target is resized *before* the swap (INTER_AREA), so the work is done at the
  output size: a 4K frame asked for at 1024x1024 costs a 1024-pixel swap.
* Video dimensions are rounded down to even numbers (yuv420p needs them). Images drop
  an odd pixel row or column rather than resample (``resize_to``); video frames are
  scaled by FFmpeg's area filter while being converted to I420.
* ``None`` keeps the target's size (videos still rounded to even).
"""

from __future__ import annotations

import dataclasses
import re

import cv2
import numpy as np
import numpy.typing as npt

from shared.errors import ValidationFailed

__all__ = ["OutputSize", "fit_within", "parse_resolution", "resize_to"]

_RESOLUTION_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX\u00d7]\s*(\d{1,5})\s*$")
MAX_SIDE = 8192


@dataclasses.dataclass(frozen=True)
class OutputSize:
    width: int
    height: int


def parse_resolution(
    resolution: str | tuple[int, int] | None, *, field: str = "resolution"
) -> OutputSize | None:
    """``"1024x1024"`` or ``(1024, 1024)`` -> OutputSize; None stays None; anything else is a
    ValidationFailed naming ``field``."""
    if resolution is None:
        return None
    if isinstance(resolution, tuple):
        width, height = resolution
    else:
        match = _RESOLUTION_PATTERN.match(resolution)
        if match is None:
            raise ValidationFailed(field, f"expected WIDTHxHEIGHT such as 1024x1024, got {resolution!r}")
        width, height = int(match.group(1)), int(match.group(2))
    if not (16 <= width <= MAX_SIDE and 16 <= height <= MAX_SIDE):
        raise ValidationFailed(
            field, f"each side must be between 16 and {MAX_SIDE} pixels, got {width}x{height}"
        )
    return OutputSize(width, height)


def fit_within(width: int, height: int, box: OutputSize | None, *, even: bool = False) -> OutputSize:
    """The size of a ``width`` x ``height`` image scaled down (never up) to fit ``box``,
    aspect ratio kept; ``even`` rounds both sides down to even numbers (minimum 2)."""
    scale = 1.0 if box is None else min(1.0, box.width / width, box.height / height)
    fitted_width = max(1, int(width * scale + 0.5)) if scale < 1 else width
    fitted_height = max(1, int(height * scale + 0.5)) if scale < 1 else height
    if even:
        fitted_width, fitted_height = max(2, fitted_width // 2 * 2), max(2, fitted_height // 2 * 2)
    return OutputSize(fitted_width, fitted_height)


def resize_to(image: npt.NDArray[np.uint8], size: OutputSize) -> npt.NDArray[np.uint8]:
    """``image`` at ``size``: unchanged if equal, cropped by the odd pixel if only rounding
    differs, otherwise resampled with INTER_AREA (the right filter for downscaling)."""
    height, width = image.shape[:2]
    if (width, height) == (size.width, size.height):
        return image
    if width - size.width in (0, 1) and height - size.height in (0, 1):
        return image[: size.height, : size.width]
    resized = cv2.resize(image, (size.width, size.height), interpolation=cv2.INTER_AREA)
    return np.asarray(resized, dtype=np.uint8)
