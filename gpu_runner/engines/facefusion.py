"""FaceFusion 3.8.1 as a runner engine: jobs go to a warm FaceFusion host per engine slot
(facefusion_warm.py, ``FACEFUSION_WARM``), or to one ``headless-run`` subprocess per job.

FaceFusion lives in the GPU container (``FACEFUSION_COMMAND``); the runner talks to it
only through its command line. What the engine relies on, read from FaceFusion 3.8.1's
source (``facefusion/program.py``, ``core.py``, ``ffmpeg.py``, ``download.py``) and checked
against the real program in the real-peer tier (tests/peers):

* Arguments: ``headless-run --source-paths S --target-path T --output-path O --processors
  face_swapper --face-swapper-model M --face-swapper-pixel-boost WxH --face-selector-mode ...``.
  Anything FaceFusion does not know is an argparse error (exit 2). FaceFusion decides image
  or video by the file extension and refuses an output whose extension differs from the
  target's, so the output is named ``result`` + the target's extension.
* It finds its processors and its models (``.assets/models``) relative to its own folder,
  so it runs from the folder of the ``.py`` script named in ``FACEFUSION_COMMAND``. Its job
  files go under ``--jobs-path`` and its temporary files under ``TMPDIR``, both in the
  task's work folder, so concurrent jobs never share state and the worker's clean-up
  removes them.
* Output size: FaceFusion keeps the target's size (``--output-*-scale`` only multiplies by
  0.25 steps). ``resolution`` is the output size as in the seed, a bounding box that never
  upscales (as the CPU engine reads it): an image target is resized before FaceFusion sees
  it; a video gets the largest ``--output-video-scale`` that fits. The pixel boost (the face
  crop the swapper works at; 1024 on a 128 model is 64 model passes per face) is its own
  parameter, ``pixel_boost``, defaulting to FaceFusion's default, the model's own size.
* Audio: FaceFusion's default encoder is the first ffmpeg offers, ``flac``, which an MP4
  cannot hold: the audio is then dropped with "restoring audio skipped" and exit 0. So the
  encoder is always given, per container (``AUDIO_ENCODERS``).
* Progress: tqdm bars on stderr (``processing:  40%|====      | 4/10 [...]``), redrawn with
  carriage returns; 3.8.1 draws ``analysing`` (content analyser) and ``processing`` for a
  video, none for an image (``--log-level info``; at warn or error the bars are off).
* Models: before each job FaceFusion checks every model it may use against a ``.hash`` file
  and downloads what is missing or does not match; with a read-only models folder and
  internet that never ends. The engine checks the files itself (facefusion_models.py):
  at start, in ``health``, and before each job; and it runs FaceFusion with its proxy set to
  a closed loopback port, so a download fails at once instead of looping.
* Exit codes: 0 success; 2 a failed pre-check (invalid arguments such as an unknown
  model or processor, ffmpeg or curl missing); 1 anything else, including a processor's
  pre-process step (no source face) and a model that fails its hash check.

Which swapper models each face-swap engine can run is in ``ENGINE_MODELS``;
``validate_request`` checks a request against it (create-time validation calls it).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Final

from gpu_runner.engines.base import EngineResult, PreparedJob, ProgressCallback
from gpu_runner.engines.cpu_swap.resolution import parse_resolution
from gpu_runner.engines.facefusion_cli import (
    AUDIO_ENCODERS,
    CONTENT_TYPES,
    IMAGE_SUFFIXES,
    FaceFusionProgressParser,
    build_headless_arguments,
    describe_output,
    face_error_code,
    face_selector_arguments,
    facefusion_environment,
    facefusion_readable_source,
    fit_image,
    output_video_scale,
    parse_progress_line,
    pixel_boost_for,
    video_fps_and_size,
)
from gpu_runner.engines.facefusion_models import (
    COMMON_MODEL_FILES,
    SWAPPER_MODEL_FILES,
    ModelCheck,
    ModelChecker,
    files_for,
)
from gpu_runner.engines.facefusion_warm import WarmHostPool
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
    "AUDIO_ENCODERS",
    "ENGINE_MODELS",
    "FACEFUSION_PIXEL_BOOSTS",
    "FaceFusionEngine",
    "FaceFusionProgressParser",
    "build_headless_arguments",
    "describe_output",
    "face_selector_arguments",
    "output_video_scale",
    "parse_progress_line",
    "pixel_boost_for",
    "supported_models",
    "validate_request",
]

_logger = get_logger(__name__)

_READ_CHUNK_BYTES: Final = 4096
# A warm host keeps its models loaded (FaceFusion's default, strict, drops them per job).
WARM_ARGUMENTS: Final = ("--video-memory-strategy", "tolerant")
# After a host failed to start, jobs go to the per-job CLI for this long before a retry.
_WARM_RETRY_S: Final = 300.0
# After the process exits, how long a grandchild still holding the pipe may delay EOF.
_DRAIN_TIMEOUT_S: Final = 2.0


@dataclasses.dataclass(frozen=True)
class _Command:
    argv: list[str]
    cwd: Path | None
    script: Path | None


class FaceFusionEngine(FaceSwapEngineBase):
    """Runs FaceFusion's ``headless-run`` (on a warm host, or as a process per job) in its
    own process group, so that a cancel or a timeout stops FaceFusion and the ffmpeg
    processes it started."""

    name = "facefusion"
    supported_models: frozenset[str] = ENGINE_MODELS["facefusion"]

    def __init__(self, settings: Settings, fetcher: SafeFetcher | None = None) -> None:
        super().__init__(settings, fetcher)
        self.execution_providers = [
            provider for provider in re.split(r"[\s,]+", settings.facefusion_execution_providers) if provider
        ]
        self.models = ModelChecker(self._models_dir())
        self._model_check: dict[str, ModelCheck] = {}
        self._pool = WarmHostPool(settings.engine_slots, settings.facefusion_warm_max_rss_mb)
        self._warm_retry_at = 0.0

    @classmethod
    def validate_request(cls, request: FaceSwapInput) -> None:
        validate_request(request, cls.name)

    def _command(self) -> _Command:
        argv = shlex.split(self.settings.facefusion_command)
        if not argv:
            raise UpstreamUnavailable("FACEFUSION_COMMAND is empty", code="facefusion_unavailable")
        script = next((Path(part) for part in argv if part.endswith(".py")), None)
        return _Command(argv, script.parent if script else None, script)

    def _models_dir(self) -> Path:
        if self.settings.facefusion_models_dir:
            return Path(self.settings.facefusion_models_dir)
        script = next(
            (Path(part) for part in shlex.split(self.settings.facefusion_command) if part.endswith(".py")),
            None,
        )
        return (script.parent if script else Path.cwd()) / ".assets" / "models"

    # --- models ---------------------------------------------------------------------------
    def check_models(self) -> dict[str, ModelCheck]:
        """Check every model file (blocking: hashes the files whose size or mtime changed)."""
        common = self.models.check(COMMON_MODEL_FILES)
        checks = {"common": common}
        for model in sorted(self.supported_models):
            checks[model] = self.models.check(SWAPPER_MODEL_FILES[model])
        self._model_check = checks
        return checks

    @property
    def accepting_work(self) -> bool:
        """False while the models every job needs are missing: the worker claims no face
        swap until they are back (health says which)."""
        checks = self._model_check
        if not checks:
            return True
        swappers_ok = any(check.ok for name, check in checks.items() if name != "common")
        return checks["common"].ok and swappers_ok

    def _raise_if_models_bad(self, swapper_model: str) -> None:
        check = self.models.check(files_for(swapper_model))
        if check.ok:
            return
        raise UpstreamUnavailable(
            f"FaceFusion's model files are not in place on this runner ({check.describe()}) in "
            f"{self.models.models_dir}: a deployment fault (see docs/deploy.md, FaceFusion models); "
            "the task is retried",
            code="models_missing",
            details={"models": list(check.bad), "models_dir": str(self.models.models_dir)},
        )

    async def start(self) -> None:
        checks = await asyncio.to_thread(self.check_models)
        bad = sorted({name for check in checks.values() for name in check.bad})
        if bad:
            log_event(
                _logger,
                "facefusion_models_missing",
                models=bad,
                models_dir=str(self.models.models_dir),
                level=40,
            )

    async def health(self) -> dict[str, Any]:
        """Checks that FaceFusion can be started and its models are in place (no run:
        loading it takes seconds and a GPU)."""
        try:
            command = self._command()
            self._check_installed(command)
        except UpstreamUnavailable as exc:
            return {"status": "unavailable", "engine": self.name, "error": exc.message}
        checks = await asyncio.to_thread(self.check_models)
        missing = sorted({name for check in checks.values() for name in check.bad})
        ready = sorted(name for name, check in checks.items() if name != "common" and check.ok)
        body: dict[str, Any] = {
            "status": "available" if self.accepting_work else "unavailable",
            "engine": self.name,
            "execution_providers": self.execution_providers,
            "models": ready,
            "models_missing": missing,
        }
        if not self.accepting_work:
            body["error"] = f"FaceFusion model files missing or corrupt: {', '.join(missing)}"
        return body

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

    # --- a job ------------------------------------------------------------------------------
    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        request: FaceSwapInput = job.metadata["request"]
        self.require_model(request, self.supported_models, "FaceFusion")
        command = self._command()
        self._check_installed(command)
        await asyncio.to_thread(self._raise_if_models_bad, request.model)
        is_video = job.metadata["target_kind"] == "video"
        target = job.inputs["target"]
        if not is_video and target.suffix not in IMAGE_SUFFIXES:
            raise JobFailed(
                f"target_url: FaceFusion cannot read {target.suffix.lstrip('.').upper()} images; "
                "send JPEG, PNG, WebP or BMP",
                code="unsupported_media",
            )
        box = parse_resolution(request.resolution)
        source = await asyncio.to_thread(facefusion_readable_source, job.inputs["source"], job.workdir)
        video_fps, video_scale = None, 1.0
        if is_video:
            video_fps, size = await asyncio.to_thread(video_fps_and_size, target)
            video_scale = output_video_scale(*size, box) if size else 1.0
        else:
            target = await asyncio.to_thread(fit_image, target, job.workdir, box)
        output = job.workdir / f"result{target.suffix}"
        jobs_path = job.workdir / "facefusion-jobs"
        temp_path = job.workdir / "facefusion-temp"
        jobs_path.mkdir(exist_ok=True)
        temp_path.mkdir(exist_ok=True)
        arguments = [
            *build_headless_arguments(
                source=source,
                target=target,
                output=output,
                jobs_path=jobs_path,
                request=request,
                execution_providers=self.execution_providers,
                video_fps=video_fps,
                video_scale=video_scale,
            ),
            "--temp-path",
            str(temp_path),
        ]
        if cancel.is_set():
            raise JobCancelled("task cancelled before FaceFusion started")
        progress(Progress(value=0, max=1, stage="starting"))
        host_command = self._host_command(command)
        if host_command is not None:
            exit_code, parser = await self._run_warm(host_command, arguments, progress, cancel)
        else:
            environment = facefusion_environment(temp_path)
            argv = [*command.argv, *arguments]
            exit_code, parser = await self._run_process(argv, command.cwd, environment, progress, cancel)
        self._raise_for_exit(exit_code, parser)
        if not output.is_file() or output.stat().st_size == 0:
            raise JobFailed(
                "FaceFusion exited successfully but wrote no output file",
                code="facefusion_no_output",
                details={"output_tail": list(parser.tail)},
            )
        content_type = CONTENT_TYPES.get(output.suffix, "application/octet-stream")
        result_output = await asyncio.to_thread(describe_output, output, content_type, is_video=is_video)
        progress(Progress(value=1, max=1, stage="finished"))
        return EngineResult(
            outputs=[result_output],
            metadata={
                "engine": self.name,
                "model": request.model,
                "pixel_boost": pixel_boost_for(request.model, request.pixel_boost),
                # FaceFusion's own timing of the job (what `make bench` sets the overhead against).
                "facefusion_s": parser.facefusion_s,
            },
        )

    # --- the warm host ------------------------------------------------------------------------
    def _host_command(self, command: _Command) -> tuple[str, Path] | None:
        """(FaceFusion's python, its folder) when jobs go to a warm host; None: per-job CLI."""
        if not self.settings.facefusion_warm or command.script is None or command.cwd is None:
            return None
        if len(command.argv) != 2 or command.argv[1] != str(command.script):
            return None  # not "python facefusion.py": nothing to host
        if time.monotonic() < self._warm_retry_at:
            return None
        return command.argv[0], command.cwd

    def _warm_up_arguments(self) -> list[str]:
        """The arguments whose models a new host loads before its first job."""
        return [
            "headless-run",
            "--processors",
            "face_swapper",
            "--face-swapper-model",
            FaceSwapInput.model_fields["model"].default,
            "--execution-providers",
            *self.execution_providers,
            *WARM_ARGUMENTS,
        ]

    async def _run_warm(
        self,
        host_command: tuple[str, Path],
        arguments: list[str],
        progress: ProgressCallback,
        cancel: asyncio.Event,
    ) -> tuple[int, FaceFusionProgressParser]:
        """Run a job on a warm host; cancel and timeout kill its process group, as a
        per-job ``headless-run`` would be killed. A host that cannot start: per-job CLI."""
        python, root = host_command
        host_temp = self.settings.data_dir / "facefusion-host"
        host_temp.mkdir(parents=True, exist_ok=True)
        try:
            host = await self._pool.acquire(
                python, root, facefusion_environment(host_temp), self._warm_up_arguments()
            )
        except UpstreamUnavailable as exc:
            self._warm_retry_at = time.monotonic() + _WARM_RETRY_S
            log_event(_logger, "facefusion_host_unavailable", error=exc.message, level=40)
            command = self._command()
            environment = facefusion_environment(Path(arguments[arguments.index("--temp-path") + 1]))
            return await self._run_process(
                [*command.argv, *arguments], command.cwd, environment, progress, cancel
            )
        parser = FaceFusionProgressParser(progress)
        job = asyncio.ensure_future(host.run([*arguments, *WARM_ARGUMENTS], parser))
        cancelled = asyncio.ensure_future(cancel.wait())
        result: dict[str, Any] | None = None
        try:
            done, _ = await asyncio.wait(
                {job, cancelled}, timeout=self.settings.task_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if job not in done:
                host.kill()
                if cancelled in done:
                    raise JobCancelled("task cancelled while FaceFusion ran")
                raise JobFailed(
                    f"FaceFusion did not finish within TASK_TIMEOUT_S={self.settings.task_timeout_s:g}s",
                    code="task_timeout",
                )
            result = job.result()
        finally:
            cancelled.cancel()
            if result is None:
                host.kill()  # also when the worker abandons the run: never leave it working
                job.cancel()
            await self._pool.release(host, result)
        face_error = result.get("face_error")
        if face_error:
            details = {key: value for key, value in face_error.items() if key not in ("code", "message")}
            raise JobFailed(str(face_error["message"]), code=str(face_error["code"]), details=details)
        return int(result["exit_code"]), parser

    async def close(self) -> None:
        await self._pool.close()

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
        if parser.failed_hashes:
            # Changed under us since the engine's own check (or a file FaceFusion checks
            # that our table lacks): a deployment fault, retried, never the user's.
            raise UpstreamUnavailable(
                f"FaceFusion found model files missing or corrupt: {', '.join(parser.failed_hashes)}",
                code="models_missing",
                details={**details, "models": list(parser.failed_hashes)},
            )
        face_code = next((code for line in tail if (code := face_error_code(line))), None)
        if face_code == "no_face_in_source":
            raise JobFailed(
                "no face was found in the source image; use a clear, frontal photo of one face",
                code=face_code,
                details=details,
            )
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
