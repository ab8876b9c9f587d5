"""A phone-sized photo (over 5 MB) of a real face, for the large-input tests.

Grace Hopper's portrait upscaled to 2600 px wide with sensor-like noise, saved as a
high-quality JPEG: the size of what a phone sends (2-5 MB and more), built locally.
"""

from __future__ import annotations

import base64
import functools

import cv2
import numpy as np

from tests.faceswap.media import grace_hopper_bgr

__all__ = ["FIVE_MB", "data_url", "five_mb_photo_jpeg"]

FIVE_MB = 5_000_000


@functools.cache
def five_mb_photo_jpeg() -> bytes:
    photo = grace_hopper_bgr()
    width = 2600
    height = round(photo.shape[0] * width / photo.shape[1])
    large = cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(19).normal(0, 12, large.shape)
    noisy = np.clip(large.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 97])
    assert ok
    jpeg = bytes(encoded.tobytes())
    assert len(jpeg) >= FIVE_MB, len(jpeg)
    return jpeg


def data_url(content: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(content).decode()}"
