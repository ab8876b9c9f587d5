"""Real test media built from photos that ship in packages (never downloaded).

Source face: grace_hopper.jpg. Target face: astronaut.png (both public domain, shipped
in comfyswap/samples). Clips are made from the astronaut photo with a slow zoom and pan, so
every frame is a real photo of a real face, with a sine tone as an AAC audio track.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt
from av.audio.stream import AudioStream

from comfyswap.samples import ASTRONAUT_PNG, GRACE_HOPPER_JPG

ByteImage = npt.NDArray[np.uint8]

GRACE_HOPPER_PATH = GRACE_HOPPER_JPG


def grace_hopper_bgr() -> ByteImage:
    image = cv2.imread(str(GRACE_HOPPER_PATH), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {GRACE_HOPPER_PATH}"
    return np.asarray(image, dtype=np.uint8)


def astronaut_bgr() -> ByteImage:
    image = cv2.imread(str(ASTRONAUT_PNG), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {ASTRONAUT_PNG}"
    return np.ascontiguousarray(image, dtype=np.uint8)


def astronaut_frame(index: int, size: int) -> ByteImage:
    """Frame ``index`` of a slow zoom-and-pan over the astronaut's head and shoulders."""
    photo = astronaut_bgr()
    phase = index / 12.0
    zoom = 1.0 + 0.08 * math.sin(phase)
    shift_x, shift_y = 10.0 * math.sin(phase * 0.7), 6.0 * math.cos(phase * 0.9)
    # A 384 px window round the face (centre ~ (225, 130) in the 512 px photo), zoomed.
    window = 384 / zoom
    centre_x, centre_y = 225 + shift_x, 200 + shift_y
    scale = size / window
    transform = np.array(
        [[scale, 0, size / 2 - centre_x * scale], [0, scale, size / 2 - centre_y * scale]], dtype=np.float64
    )
    frame = cv2.warpAffine(
        photo, transform, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    return np.asarray(frame, dtype=np.uint8)


def write_clip(
    path: Path,
    *,
    frame_count: int,
    size: int = 320,
    fps: int = 25,
    audio_codec: str | None = "aac",
    audio_rate: int = 44_100,
    blank_frames: frozenset[int] = frozenset(),
) -> None:
    """An MP4 (or MKV for non-AAC audio) of the astronaut clip with a 440 Hz tone as long as
    the video; ``blank_frames`` are flat grey (no face)."""
    container_format = "mp4" if audio_codec in (None, "aac") else "matroska"
    with av.open(str(path), mode="w", format=container_format) as container:
        video = container.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "ultrafast"})
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio: AudioStream | None = None
        if audio_codec is not None:
            added = container.add_stream(audio_codec, rate=audio_rate)
            assert isinstance(added, AudioStream)
            audio = added
            audio.layout = "mono"
        for index in range(frame_count):
            image = (
                np.full((size, size, 3), 128, np.uint8)
                if index in blank_frames
                else astronaut_frame(index, size)
            )
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            total_samples = round(frame_count / fps * audio_rate)
            chunk = 1024
            for start in range(0, total_samples, chunk):
                count = min(chunk, total_samples - start)
                times = (np.arange(start, start + count) / audio_rate).astype(np.float32)
                samples = (0.2 * np.sin(2 * np.pi * 440 * times)).astype(np.float32)[np.newaxis]
                audio_frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                audio_frame.sample_rate = audio_rate
                audio_frame.pts = start
                audio_frame.time_base = Fraction(1, audio_rate)
                container.mux(audio.encode(audio_frame))
            container.mux(audio.encode(None))
