"""FaceFusion 3.x as a runner engine: one ``headless-run`` subprocess per job.

FaceFusion lives in the GPU container (``FACEFUSION_COMMAND``); the runner talks to it
only through its documented command line, so any 3.x release can be dropped in. What
the engine relies on, read from FaceFusion 3.0-3.8:

* Arguments: ``headless-run -s SOURCE -t TARGET -o OUTPUT --processors face_swapper
  --face-swapper-model M --face-swapper-pixel-boost WxH --face-selector-mode ...``.
  Anything FaceFusion does not know is an argparse error (exit 2), so only arguments
  every 3.x release accepts are passed. FaceFusion decides image or video by the file
  extension and refuses an output whose extension differs from the target's, so the
  output is named ``result`` + the target's extension.
* It finds its processors relative to the working directory, so it runs from the
  folder of the ``.py`` script named in ``FACEFUSION_COMMAND``. Its job files go under
  ``--jobs-path`` and its temporary frames under ``TMPDIR``, both in the task's work
  folder, so concurrent jobs never share state and the worker's clean-up removes them.
* Progress: tqdm bars on stderr (``processing:  40%|====      | 4/10 [...]``), redrawn
  with carriage returns, for the stages analysing, extracting, processing and merging
  (``--log-level info``; at warn or error FaceFusion turns the bars off).
* Exit codes: 0 success; 2 a failed pre-check (invalid arguments such as an unknown
  model or processor, ffmpeg or curl missing); 1 anything else, including a processor's
  pre-process step (no source face, a model that cannot be downloaded), which
  ``headless-run`` reports as a failed job. Codes 3 and 4 exist inside FaceFusion but
  ``headless-run`` folds them into 1.

Which swapper models each face-swap engine can run is in ``ENGINE_MODELS``;
``validate_request`` checks a request against it (create-time validation calls it).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from gpu_runner.engines.base import EngineOutput, EngineResult, PreparedJob, ProgressCallback
from gpu_runner.engines.faceswap import FaceSwapEngineBase
from shared.errors import JobCancelled, JobFailed, UpstreamUnavailable
from shared.logs import get_logger, log_event
from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.tasks import Progress
from shared.workflows import (
    ENGINE_MODELS,
    FACEFUSION_PIXEL_BOOSTS,
    FaceSwapInput,
    supported_models,
)
from shared.workflows import validate_for_engine as validate_request

__all__ = [
    "ENGINE_MODELS",
    "FACEFUSION_PIXEL_BOOSTS",
    "FaceFusionEngine",
    "FaceFusionProgressParser",
    "build_headless_arguments",
    "describe_output",
    "face_selector_arguments",
    "parse_progress_line",
    "pixel_boost_for",
    "supported_models",
    "validate_request",
]

_logger = get_logger(__name__)

# Frame stages FaceFusion draws a bar for (its English locale; downloads count bytes).
_FRAME_STAGES: Final = frozenset({"analysing", "extracting", "processing", "merging"})
# tqdm's default bar: "{desc}: {percent:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate}{postfix}]".
_PROGRESS_LINE: Final = re.compile(
    r"^\s*(?P<stage>[a-z][a-z ]*?):\s*(?P<percent>\d{1,3})%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)\b"
)
# FaceFusion reads images by these extensions only (GIF is not one of them).
_IMAGE_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
_CONTENT_TYPES: Final[Mapping[str, str]] = MappingProxyType(
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
_OUTPUT_TAIL_LINES: Final = 20
_READ_CHUNK_BYTES: Final = 4096
# After the process exits, how long a grandchild still holding the pipe may delay EOF.
_DRAIN_TIMEOUT_S: Final = 2.0


def pixel_boost_for(model: str, resolution: str) -> str:
    """The ``--face-swapper-pixel-boost`` for a request's ``resolution``.

    FaceFusion has no output-size option: the output keeps the target's size. What it
    can scale is the face crop the swapper works at (the pixel boost; larger is sharper
    and slower, 1024 on a 128 model is 64 passes per face). The seed passed
    ``resolution`` to its FaceFusion service for this, so the shorter side of
    ``resolution`` picks the nearest boost the model accepts; a tie picks the smaller,
    cheaper one.
    """
    width, _, height = resolution.partition("x")
    side = min(int(width), int(height))
    choices = FACEFUSION_PIXEL_BOOSTS[model]

    def distance(choice: str) -> tuple[int, int]:
        boost = int(choice.partition("x")[0])
        return abs(boost - side), boost

    return min(choices, key=distance)


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
        pixel_boost_for(request.model, request.resolution),
        *face_selector_arguments(request.face_selector),
        "--execution-providers",
        *execution_providers,
        "--log-level",
        "info",
    ]
    if output.suffix in _IMAGE_SUFFIXES:
        arguments += ["--output-image-quality", str(IMAGE_QUALITY)]
    else:
        # libx264 cannot go into WebM; VP9 is the encoder FaceFusion offers for it.
        encoder = "libvpx-vp9" if output.suffix == ".webm" else "libx264"
        arguments += ["--output-video-encoder", encoder, "--output-video-quality", str(VIDEO_QUALITY)]
        if video_fps:
            arguments += ["--output-video-fps", f"{video_fps:g}"]
    return arguments


def parse_progress_line(line: str) -> Progress | None:
    """A FaceFusion frame progress bar as Progress(frames done, frames total, stage)."""
    match = _PROGRESS_LINE.match(line)
    if match is None or match.group("stage") not in _FRAME_STAGES:
        return None
    total = int(match.group("total"))
    return Progress(value=int(match.group("done")), max=max(total, 1), stage=match.group("stage"))


class FaceFusionProgressParser:
    """Splits FaceFusion's merged output into lines (tqdm redraws with ``\\r``, logs end
    with ``\\n``), reports progress bars and keeps the last log lines for error messages."""

    def __init__(self, progress: ProgressCallback) -> None:
        self._progress = progress
        self._pending = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
        self.last_progress: Progress | None = None

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
            self.tail.append(line[:500])
        elif parsed != self.last_progress:
            self.last_progress = parsed
            self._progress(parsed)


@dataclasses.dataclass(frozen=True)
class _Command:
    argv: list[str]
    cwd: Path | None
    script: Path | None


class FaceFusionEngine(FaceSwapEngineBase):
    """Runs FaceFusion's ``headless-run`` per job, in its own process group so that a
    cancel or a timeout stops FaceFusion and the ffmpeg processes it started."""

    name = "facefusion"
    supported_models: frozenset[str] = ENGINE_MODELS["facefusion"]

    def __init__(self, settings: Settings, fetcher: SafeFetcher | None = None) -> None:
        super().__init__(settings, fetcher)
        self.execution_providers = [
            provider for provider in re.split(r"[\s,]+", settings.facefusion_execution_providers) if provider
        ]

    @classmethod
    def validate_request(cls, request: FaceSwapInput) -> None:
        validate_request(request, cls.name)

    def _command(self) -> _Command:
        argv = shlex.split(self.settings.facefusion_command)
        if not argv:
            raise UpstreamUnavailable("FACEFUSION_COMMAND is empty", code="facefusion_unavailable")
        script = next((Path(part) for part in argv if part.endswith(".py")), None)
        return _Command(argv, script.parent if script else None, script)

    async def health(self) -> dict[str, Any]:
        """Checks that FaceFusion can be started (no run: loading it takes seconds and a GPU)."""
        try:
            command = self._command()
            self._check_installed(command)
        except UpstreamUnavailable as exc:
            return {"status": "unavailable", "engine": self.name, "error": exc.message}
        return {
            "status": "available",
            "engine": self.name,
            "execution_providers": self.execution_providers,
            "models": sorted(self.supported_models),
        }

    @staticmethod
    def _check_installed(command: _Command) -> None:
        executable = command.argv[0]
        if shutil.which(executable) is None:
            raise UpstreamUnavailable(
                f"FaceFusion cannot be started: {executable!r} was not found", code="facefusion_unavailable"
            )
        if command.script is not None and not command.script.is_file():
            raise UpstreamUnavailable(
                f"FaceFusion cannot be started: {str(command.script)!r} does not exist",
                code="facefusion_unavailable",
            )

    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        request: FaceSwapInput = job.metadata["request"]
        if request.model not in self.supported_models:
            raise JobFailed(
                f"model {request.model!r} cannot run on FaceFusion; available: "
                f"{', '.join(sorted(self.supported_models))}",
                code="model_not_supported",
            )
        command = self._command()
        self._check_installed(command)
        source = await asyncio.to_thread(_facefusion_readable_source, job.inputs["source"], job.workdir)
        target = job.inputs["target"]
        is_video = job.metadata["target_kind"] == "video"
        if not is_video and target.suffix not in _IMAGE_SUFFIXES:
            raise JobFailed(
                f"target_url: FaceFusion cannot read {target.suffix.lstrip('.').upper()} images; "
                "send JPEG, PNG, WebP or BMP",
                code="unsupported_media",
            )
        output = job.workdir / f"result{target.suffix}"
        jobs_path = job.workdir / "facefusion-jobs"
        temp_path = job.workdir / "facefusion-temp"
        jobs_path.mkdir(exist_ok=True)
        temp_path.mkdir(exist_ok=True)
        video_fps = await asyncio.to_thread(_video_fps, target) if is_video else None
        argv = [
            *command.argv,
            *build_headless_arguments(
                source=source,
                target=target,
                output=output,
                jobs_path=jobs_path,
                request=request,
                execution_providers=self.execution_providers,
                video_fps=video_fps,
            ),
        ]
        environment = {**os.environ, "TMPDIR": str(temp_path), "PYTHONUNBUFFERED": "1"}
        if cancel.is_set():
            raise JobCancelled("task cancelled before FaceFusion started")
        progress(Progress(value=0, max=1, stage="starting"))
        exit_code, parser = await self._run_process(argv, command.cwd, environment, progress, cancel)
        self._raise_for_exit(exit_code, parser)
        if not output.is_file() or output.stat().st_size == 0:
            raise JobFailed(
                "FaceFusion exited successfully but wrote no output file",
                code="facefusion_no_output",
                details={"output_tail": list(parser.tail)},
            )
        content_type = _CONTENT_TYPES.get(output.suffix, "application/octet-stream")
        result_output = await asyncio.to_thread(describe_output, output, content_type, is_video=is_video)
        progress(Progress(value=1, max=1, stage="finished"))
        return EngineResult(
            outputs=[result_output],
            metadata={
                "engine": self.name,
                "model": request.model,
                "pixel_boost": pixel_boost_for(request.model, request.resolution),
            },
        )

    async def _run_process(
        self,
        argv: list[str],
        cwd: Path | None,
        environment: dict[str, str],
        progress: ProgressCallback,
        cancel: asyncio.Event,
    ) -> tuple[int, FaceFusionProgressParser]:
        """Run FaceFusion to its end, a cancel, or TASK_TIMEOUT_S, whichever comes first."""
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=environment,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise UpstreamUnavailable(
                f"FaceFusion could not be started: {exc}", code="facefusion_unavailable"
            ) from exc
        log_event(_logger, "facefusion_started", pid=process.pid)
        parser = FaceFusionProgressParser(progress)
        reader = asyncio.ensure_future(_read_output(process, parser))
        exited = asyncio.ensure_future(process.wait())
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            done, _ = await asyncio.wait(
                {exited, cancelled}, timeout=self.settings.task_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if exited not in done:
                _kill_process_group(process)
                if cancelled in done:
                    raise JobCancelled("task cancelled while FaceFusion ran")
                raise JobFailed(
                    f"FaceFusion did not finish within TASK_TIMEOUT_S={self.settings.task_timeout_s:g}s",
                    code="task_timeout",
                )
        finally:
            cancelled.cancel()
            # Also reached when the worker cancels this coroutine: never leave FaceFusion running.
            if process.returncode is None:
                _kill_process_group(process)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(exited)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, timeout=_DRAIN_TIMEOUT_S)
            parser.close()
        return exited.result(), parser

    @staticmethod
    def _raise_for_exit(exit_code: int, parser: FaceFusionProgressParser) -> None:
        if exit_code == 0:
            return
        tail = list(parser.tail)
        last_lines = "\n".join(tail[-8:])[-2000:] or "(no output)"
        details: dict[str, Any] = {"exit_code": exit_code, "output_tail": tail}
        if parser.last_progress is not None:
            details["last_progress"] = parser.last_progress.model_dump()
        if exit_code == 2:
            raise JobFailed(
                f"FaceFusion refused the job at its pre-check (exit 2):\n{last_lines}",
                code="facefusion_precheck_failed",
                details=details,
            )
        reason = f"killed by signal {-exit_code}" if exit_code < 0 else f"exit {exit_code}"
        raise JobFailed(
            f"FaceFusion failed ({reason}):\n{last_lines}", code="facefusion_failed", details=details
        )


async def _read_output(process: asyncio.subprocess.Process, parser: FaceFusionProgressParser) -> None:
    """Read until EOF: an unread pipe would fill and stall FaceFusion mid-job."""
    assert process.stdout is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := await process.stdout.read(_READ_CHUNK_BYTES):
        parser.feed(decoder.decode(chunk))
    parser.feed(decoder.decode(b"", final=True))


def _kill_process_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL FaceFusion's whole process group (its ffmpeg children too).

    Sent while the leader is known to be unreaped, so the group id is still ours; one
    signal to the group, not TERM-then-KILL, because nothing in it holds state we keep
    (its files are in the task's work folder, which the worker deletes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    log_event(_logger, "facefusion_killed", pid=process.pid)


def _facefusion_readable_source(source: Path, workdir: Path) -> Path:
    """FaceFusion reads source images by extension and not GIF: use the first frame as PNG."""
    if source.suffix in _IMAGE_SUFFIXES:
        return source
    from PIL import Image

    converted = workdir / "source-converted.png"
    with Image.open(source) as image:
        image.convert("RGB").save(converted)
    return converted


def _video_fps(path: Path) -> float | None:
    """The target's frame rate, passed on so the output keeps it whatever facefusion.ini says."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return round(float(Fraction(rate)), 3) if rate else None
    except (av.FFmpegError, IndexError):
        return None


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
                },
            )
    except (av.FFmpegError, IndexError) as exc:
        raise JobFailed(
            f"FaceFusion wrote a video that cannot be read: {exc}", code="facefusion_no_output"
        ) from exc
