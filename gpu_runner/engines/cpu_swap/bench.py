"""Benchmark of the CPU face swap on real photos: ms per image, video fps, peak memory.

Run ``python -m gpu_runner.engines.cpu_swap.bench`` (the photos are the ones shipped
in comfyswap/samples). Images: Grace Hopper's face
into the astronaut photo at 512 and 1024 px (median of 5 after one warm-up, model
inference included). Video: a 720p H.264 clip of 60 frames at 25 fps, built from the
astronaut photo with a zoom and pan, with an AAC tone; fps is frames over wall time of
the whole swap_video call (decode, swap, encode, mux). Peak RSS is the process's high
water mark, read after the video.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt
from av.audio.stream import AudioStream

from .swapper import FaceSwapper

ByteImage = npt.NDArray[np.uint8]


def _sample_photos() -> tuple[ByteImage, ByteImage]:
    """(source, target): Grace Hopper and the astronaut, the photos shipped in comfyswap/samples."""
    from comfyswap.samples import ASTRONAUT_PNG, GRACE_HOPPER_JPG

    source = cv2.imread(str(GRACE_HOPPER_JPG))
    target = cv2.imread(str(ASTRONAUT_PNG))
    return np.asarray(source, dtype=np.uint8), np.ascontiguousarray(target, dtype=np.uint8)


def _median_ms(swapper: FaceSwapper, source_photo: ByteImage, target: ByteImage, runs: int) -> float:
    source = swapper.prepare_source(source_photo)
    swapper.swap_image(source, target)
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        swapper.swap_image(source, target)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def _write_720p_clip(path: Path, photo: ByteImage, frame_count: int, fps: int = 25) -> None:
    width, height, audio_rate = 1280, 720, 44_100
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream("aac", rate=audio_rate)
        assert isinstance(audio, AudioStream)
        audio.layout = "mono"
        for index in range(frame_count):
            zoom = 1.0 + 0.08 * math.sin(index / 12)
            scale = height / 420 * zoom
            centre_x, centre_y = 225 + 10 * math.sin(index / 17), 190
            transform = np.array(
                [[scale, 0, width / 2 - centre_x * scale], [0, scale, height / 2 - centre_y * scale]]
            )
            image = cv2.warpAffine(photo, transform, (width, height), borderMode=cv2.BORDER_REFLECT)
            frame = av.VideoFrame.from_ndarray(np.asarray(image, dtype=np.uint8), format="bgr24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples_total = round(frame_count / fps * audio_rate)
        for start in range(0, samples_total, 1024):
            times = np.arange(start, min(start + 1024, samples_total)) / audio_rate
            tone = (0.2 * np.sin(2 * np.pi * 440 * times)).astype(np.float32)[np.newaxis]
            audio_frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            audio_frame.sample_rate, audio_frame.pts = audio_rate, start
            audio_frame.time_base = Fraction(1, audio_rate)
            container.mux(audio.encode(audio_frame))
        container.mux(audio.encode(None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per image size (default 5)")
    parser.add_argument("--frames", type=int, default=60, help="frames in the 720p clip (default 60)")
    args = parser.parse_args(argv)

    source_photo, target_photo = _sample_photos()
    swapper = FaceSwapper()
    rows: list[tuple[str, str]] = []
    for side in (512, 1024):
        target = np.asarray(
            cv2.resize(target_photo, (side, side), interpolation=cv2.INTER_CUBIC), dtype=np.uint8
        )
        rows.append(
            (f"image {side}x{side}", f"{_median_ms(swapper, source_photo, target, args.runs):.1f} ms")
        )

    with tempfile.TemporaryDirectory(prefix="cpu-swap-bench-") as folder:
        clip_path, output_path = Path(folder) / "clip.mp4", Path(folder) / "swapped.mp4"
        _write_720p_clip(clip_path, target_photo, args.frames)
        source = swapper.prepare_source(source_photo)
        started = time.perf_counter()
        info = swapper.swap_video(source, clip_path, output_path)
        seconds = time.perf_counter() - started
    rows.append((f"video 1280x720, {info.frames} frames", f"{info.frames / seconds:.1f} fps"))
    rows.append(("video per frame", f"{seconds / info.frames * 1000:.1f} ms"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    rows.append(("peak RSS (process)", f"{peak_mib:.0f} MiB"))

    width = max(len(name) for name, _ in rows)
    sys.stdout.write("\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
