"""Video inputs judged from their container's metadata, before any frame is decoded.

Runner-only (PyAV): the runner's fetchers are built with ``check_video``; the functions,
which never fetch a video, do not import it.
"""

from __future__ import annotations

from pathlib import Path

import av

from shared.errors import UnsafeInput

__all__ = ["check_video"]


def check_video(path: Path, *, max_pixels: int, max_frames: int, max_duration_s: float) -> tuple[int, int]:
    """Refuse a video whose frames, frame count or duration are over the caps, from the
    container's metadata alone (no frame is decoded); return ``(width, height)``.

    Frame count: the container's, else duration x frame rate. A stream that declares
    neither is refused: its length cannot be known without decoding it all.
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnsafeInput("video has no video stream", code="unsupported_media")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if stream.duration is not None and stream.time_base is not None:
                duration_s: float | None = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration_s = container.duration / av.time_base
            else:
                duration_s = None
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            frames = stream.frames or (round(duration_s * rate) if duration_s is not None and rate else 0)
    except av.FFmpegError as exc:
        raise UnsafeInput(f"video is corrupt or unreadable ({exc})", code="corrupt_media") from exc
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise UnsafeInput(
            f"video frames are {width}x{height} pixels; the limit is {max_pixels} pixels (MAX_IMAGE_PIXELS)",
            code="image_too_large",
            details={"width": width, "height": height, "max_pixels": max_pixels},
        )
    if not frames and duration_s is None:
        raise UnsafeInput("video declares neither its length nor its frame count", code="video_too_long")
    if frames > max_frames or (duration_s is not None and duration_s > max_duration_s):
        raise UnsafeInput(
            f"video has {frames} frames over {duration_s or 0:.1f} s; the limits are {max_frames} frames "
            f"(MAX_VIDEO_FRAMES) and {max_duration_s:g} s (MAX_VIDEO_DURATION_S)",
            code="video_too_long",
            details={"frames": frames, "duration_s": duration_s, "max_frames": max_frames},
        )
    return width, height
