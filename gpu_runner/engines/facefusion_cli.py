"""FaceFusion's command line as the engine uses it: the ``headless-run`` arguments for a
request, the progress bars and log lines it prints, its environment, and what its output
holds. Pure functions, no process handling (facefusion.py runs the process); see
facefusion.py's docstring for what each choice rests on in FaceFusion 3.8.1's source.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from gpu_runner.engines.base import EngineOutput, ProgressCallback
from gpu_runner.engines.cpu_swap.resolution import OutputSize, fit_within
from shared.errors import JobFailed
from shared.tasks import Progress
from shared.workflows import FACEFUSION_PIXEL_BOOSTS, FaceSwapInput

__all__ = [
    "AUDIO_ENCODERS",
    "CONTENT_TYPES",
    "IMAGE_QUALITY",
    "IMAGE_SUFFIXES",
    "VIDEO_QUALITY",
    "FaceFusionProgressParser",
    "build_headless_arguments",
    "describe_output",
    "face_error_code",
    "face_selector_arguments",
    "facefusion_environment",
    "facefusion_readable_source",
    "fit_image",
    "output_video_scale",
    "parse_progress_line",
    "pixel_boost_for",
    "video_fps_and_size",
]

# Frame stages FaceFusion draws a bar for (its English locale; 3.8.1 draws analysing and
# processing for a video; older 3.x also extracting and merging; downloads count bytes).
_FRAME_STAGES: Final = frozenset({"analysing", "extracting", "processing", "merging"})
# Any tqdm bar (a download's counts bytes as "1.5M/3.2M"): progress, never an error line.
_ANY_BAR: Final = re.compile(r"^\s*[A-Za-z][A-Za-z ]*:\s*\d{1,3}%\|")
# FaceFusion's hash check failing (download.py): a deployment fault, not the job's.
_HASH_FAILED: Final = re.compile(r"validating (?:hash|source) for (?P<name>[\w.-]+) failed")
# FaceFusion's own timing of the job ("processing to image succeeded in 1.05 seconds").
_SUCCEEDED: Final = re.compile(r"processing to (?:image|video) succeeded in (?P<seconds>[\d.]+) seconds")
# tqdm's default bar: "{desc}: {percent:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate}{postfix}]".
_PROGRESS_LINE: Final = re.compile(
    r"^\s*(?P<stage>[A-Za-z][A-Za-z ]*?):\s*(?P<percent>\d{1,3})%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)\b"
)
# FaceFusion reads images by these extensions only (GIF is not one of them).
IMAGE_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CONTENT_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".png": "image/png",
        ".webp": "image/webp",
        ".bmp": "image/bmp",
        ".mp4": "video/mp4",
        ".mov": "video/quicktime",
        ".webm": "video/webm",
        ".mkv": "video/x-matroska",
    }
)
# FaceFusion's default video quality (0-100, mapped to the encoder's CRF), stated
# explicitly so a facefusion.ini in the container cannot change our output.
VIDEO_QUALITY: Final = 80
# The CPU engine writes JPEGs at 95; FaceFusion's own default (80) is visibly softer.
IMAGE_QUALITY: Final = 95
# The audio encoder per output container (FaceFusion's own default, flac, cannot go into
# MP4 or MOV, and FaceFusion then drops the audio without failing). Its fix_audio_encoder
# would switch webm to libopus and mov to aac itself; stated here for every container.
AUDIO_ENCODERS: Final[Mapping[str, str]] = MappingProxyType(
    {".mp4": "aac", ".m4v": "aac", ".mov": "aac", ".mkv": "aac", ".avi": "aac", ".webm": "libopus"}
)
# Video encoder per container: libx264 cannot go into WebM; VP9 is FaceFusion's choice there.
_VIDEO_ENCODERS: Final[Mapping[str, str]] = MappingProxyType({".webm": "libvpx-vp9"})
# FaceFusion's --output-video-scale choices are 0.25 steps.
_SCALE_STEP: Final = 0.25
# Where FaceFusion's curl goes instead of GitHub / Hugging Face: a closed loopback port
# (discard), so a model download fails in milliseconds and a job never waits on it.
_NO_DOWNLOAD_PROXY: Final = "http://127.0.0.1:9"
_OUTPUT_TAIL_LINES: Final = 20


def pixel_boost_for(model: str, pixel_boost: str | None) -> str:
    """The ``--face-swapper-pixel-boost``: the request's, else FaceFusion's default (the
    first choice, the model's own size: one model pass per face)."""
    return pixel_boost or FACEFUSION_PIXEL_BOOSTS[model][0]


def output_video_scale(width: int, height: int, box: OutputSize | None) -> float:
    """The largest ``--output-video-scale`` (0.25 steps, at most 1: never upscale) that
    fits a ``width`` x ``height`` video inside ``box``; 0.25 if even that does not fit."""
    if box is None:
        return 1.0
    fits = min(box.width / width, box.height / height, 1.0)
    return max(_SCALE_STEP, int(fits / _SCALE_STEP) * _SCALE_STEP)


def face_selector_arguments(face_selector: str | int) -> list[str]:
    """Our ``face_selector`` in FaceFusion's terms. ``largest``: mode ``one`` over faces
    ordered large to small; ``all``: mode ``many``; an index: mode ``reference`` with the
    face at that position (same order, 0 = largest) as the reference, which in a video
    follows that person from frame to frame."""
    if face_selector == "all":
        return ["--face-selector-mode", "many"]
    if face_selector == "largest":
        return ["--face-selector-mode", "one", "--face-selector-order", "large-small"]
    return [
        "--face-selector-mode",
        "reference",
        "--face-selector-order",
        "large-small",
        "--reference-face-position",
        str(int(face_selector)),
    ]


def build_headless_arguments(
    *,
    source: Path,
    target: Path,
    output: Path,
    jobs_path: Path,
    request: FaceSwapInput,
    execution_providers: Sequence[str],
    video_fps: float | None,
    video_scale: float = 1.0,
) -> list[str]:
    """Everything after the command: ``headless-run`` and its options (no trim: whole target)."""
    arguments = [
        "headless-run",
        "--source-paths",
        str(source),
        "--target-path",
        str(target),
        "--output-path",
        str(output),
        "--jobs-path",
        str(jobs_path),
        "--processors",
        "face_swapper",
        "--face-swapper-model",
        request.model,
        "--face-swapper-pixel-boost",
        pixel_boost_for(request.model, request.pixel_boost),
        *face_selector_arguments(request.face_selector),
        "--execution-providers",
        *execution_providers,
        "--log-level",
        "info",
    ]
    if output.suffix in IMAGE_SUFFIXES:
        arguments += ["--output-image-quality", str(IMAGE_QUALITY)]
    else:
        arguments += [
            "--output-video-encoder",
            _VIDEO_ENCODERS.get(output.suffix, "libx264"),
            "--output-video-quality",
            str(VIDEO_QUALITY),
            "--output-audio-encoder",
            AUDIO_ENCODERS.get(output.suffix, "aac"),
        ]
        if video_scale != 1.0:
            arguments += ["--output-video-scale", f"{video_scale:g}"]
        if video_fps:
            arguments += ["--output-video-fps", f"{video_fps:g}"]
    return arguments


def face_error_code(text: str) -> str | None:
    """The CPU engine's code for a FaceFusion message about a missing face, if ``text`` is
    one: 3.8.1 logs "no source face detected!"; the seed's HTTP service passes such
    messages on in its ``error``."""
    lowered = text.lower()
    if "no source face" in lowered or "source face not" in lowered:
        return "no_face_in_source"
    if "no target face" in lowered or "no face" in lowered or "face not found" in lowered:
        return "no_face_in_target"
    return None


def parse_progress_line(line: str) -> Progress | None:
    """A FaceFusion frame progress bar as Progress(frames done, frames total, stage)."""
    match = _PROGRESS_LINE.match(line)
    # 3.3 capitalised its stage names ("Processing"), 3.5+ does not.
    stage = match.group("stage").lower() if match else ""
    if match is None or stage not in _FRAME_STAGES:
        return None
    total = int(match.group("total"))
    return Progress(value=int(match.group("done")), max=max(total, 1), stage=stage)


class FaceFusionProgressParser:
    """Splits FaceFusion's merged output into lines (tqdm redraws with ``\\r``, logs end
    with ``\\n``), reports progress bars and keeps the last log lines for error messages."""

    def __init__(self, progress: ProgressCallback) -> None:
        self._progress = progress
        self._pending = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
        self.last_progress: Progress | None = None
        self.failed_hashes: list[str] = []
        self.facefusion_s: float | None = None

    def feed(self, text: str) -> None:
        segments = re.split(r"[\r\n]", self._pending + text)
        self._pending = segments.pop()
        for segment in segments:
            self._line(segment)

    def close(self) -> None:
        if self._pending:
            self._line(self._pending)
            self._pending = ""

    def _line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        parsed = parse_progress_line(line)
        if parsed is None:
            if _ANY_BAR.match(line):
                return
            self.tail.append(line[:500])
            succeeded = _SUCCEEDED.search(line)
            if succeeded:
                self.facefusion_s = float(succeeded.group("seconds"))
            failed = _HASH_FAILED.search(line)
            if failed and failed.group("name") not in self.failed_hashes:
                self.failed_hashes.append(failed.group("name"))
        elif parsed != self.last_progress:
            self.last_progress = parsed
            self._progress(parsed)


def facefusion_readable_source(source: Path, workdir: Path) -> Path:
    """FaceFusion reads source images by extension and not GIF: use the first frame as PNG."""
    if source.suffix in IMAGE_SUFFIXES:
        return source
    from PIL import Image

    converted = workdir / "source-converted.png"
    with Image.open(source) as image:
        image.convert("RGB").save(converted)
    return converted


def facefusion_environment(temp_path: Path) -> dict[str, str]:
    """FaceFusion's environment: its temp files in the job's folder, unbuffered output, and
    every proxy variable curl reads pointed at a closed loopback port, so a model download
    (FaceFusion's loop never ends on a read-only folder) fails at once."""
    environment = {**os.environ, "TMPDIR": str(temp_path), "PYTHONUNBUFFERED": "1"}
    for variable in ("http_proxy", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        environment[variable] = _NO_DOWNLOAD_PROXY
    for variable in ("no_proxy", "NO_PROXY"):
        environment.pop(variable, None)
    return environment


def fit_image(target: Path, workdir: Path, box: OutputSize | None) -> Path:
    """The target resized (area filter, aspect kept, never enlarged) to fit ``resolution``;
    the target itself when it already fits. Same extension: FaceFusion requires it."""
    from PIL import Image

    with Image.open(target) as image:
        fitted = fit_within(image.width, image.height, box)
        if (fitted.width, fitted.height) == image.size:
            return target
        resized = workdir / f"target-fitted{target.suffix}"
        image.resize((fitted.width, fitted.height), Image.Resampling.BOX).save(resized)
    return resized


def video_fps_and_size(path: Path) -> tuple[float | None, tuple[int, int] | None]:
    """The target's frame rate (passed on so the output keeps it whatever facefusion.ini
    says) and its frame size (for the output scale)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = round(float(Fraction(rate)), 3) if rate else None
            return fps, (stream.codec_context.width, stream.codec_context.height)
    except (av.FFmpegError, IndexError):
        return None, None


def describe_output(path: Path, content_type: str, *, is_video: bool) -> EngineOutput:
    """An EngineOutput with the size (and for videos duration, frames, fps, audio) read
    from the file FaceFusion wrote; an unreadable video is a failed job, not an upload."""
    if not is_video:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError) as exc:
            raise JobFailed(
                f"FaceFusion wrote an image that cannot be read: {exc}", code="facefusion_no_output"
            ) from exc
        return EngineOutput(path=path, content_type=content_type, kind="image", width=width, height=height)
    import av

    try:
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            duration = float(container.duration) / 1_000_000 if container.duration else None
            return EngineOutput(
                path=path,
                content_type=content_type,
                kind="video",
                width=video.codec_context.width,
                height=video.codec_context.height,
                duration=duration,
                extra={
                    "frames": video.frames,
                    "fps": round(float(video.average_rate), 3) if video.average_rate else None,
                    "has_audio": bool(container.streams.audio),
                    "audio_duration": _stream_duration(container.streams.audio[0])
                    if container.streams.audio
                    else None,
                },
            )
    except (av.FFmpegError, IndexError) as exc:
        raise JobFailed(
            f"FaceFusion wrote a video that cannot be read: {exc}", code="facefusion_no_output"
        ) from exc


def _stream_duration(stream: Any) -> float | None:
    if stream.duration is None or stream.time_base is None:
        return None
    return round(float(stream.duration * stream.time_base), 3)
