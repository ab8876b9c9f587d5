"""The seed's FaceFusion HTTP service (``FACE_SWAP_API_URL``) as a runner engine.

Existing deployments run FaceFusion behind a small HTTP API next to the runner; this
engine speaks that API as the seed's ``FaceSwapService`` did, keeping its intent and
fixing what could not survive production:

* ``GET /health`` first; a service that does not answer 200 is ``UpstreamUnavailable``
  (retryable: the task goes back to the queue instead of failing).
* ``POST /process`` with ``FaceSwapRequest`` ``{source_url, target_url, resolution,
  model}``, up to ``FACE_SWAP_RETRY_COUNT`` attempts of ``FACE_SWAP_TIMEOUT`` seconds,
  with exponential backoff (1, 2, 4 ... s, as the seed) after timeouts, connection
  errors, 429 and 5xx. A timed-out attempt may still be running on the service; the seed
  retried it all the same, and so do we, because the service has no idempotency key.
  Other 4xx answers are the request's fault: ``JobFailed``, no retry.
* The URLs sent are the task's original URLs. The service fetches its inputs itself, so
  this is what it understands; ``prepare`` has already fetched both through the
  SSRF-safe fetcher, so they are known to be public http(s) (or ``data:``) media. The
  service resolves the host again, so a DNS answer that changes between the two fetches
  is the service's exposure, as it was in the seed.
* ``FaceSwapResponse.output_path`` is a path on the file system shared with the service.
  The seed appended it to a hard-coded folder; here it must resolve, symlinks followed,
  inside ``FACE_SWAP_SHARED_DIR``, or the job fails with ``unsafe_output_path``: a
  compromised or buggy service must not make the runner upload ``/etc/shadow``. The file
  is then moved into the task's work folder, so the worker's clean-up deletes it and the
  shared folder does not fill up.

The service has no cancel call: a cancelled task stops waiting at once, and the service
finishes its swap unobserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpu_runner.engines.base import EngineOutput, EngineResult, PreparedJob, ProgressCallback
from gpu_runner.engines.facefusion import ENGINE_MODELS, describe_output
from gpu_runner.engines.facefusion_cli import face_error_code
from gpu_runner.engines.faceswap import FaceSwapEngineBase
from shared.errors import JobCancelled, JobFailed, UnsafeInput, UpstreamUnavailable
from shared.logs import get_logger, log_event
from shared.media import MEDIA_EXTENSIONS, sniff_kind
from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.tasks import Progress
from shared.workflows import FaceSwapInput

__all__ = [
    "FaceFusionApiEngine",
    "FaceSwapRequest",
    "FaceSwapResponse",
    "resolve_output_path",
]

_logger = get_logger(__name__)
_T = TypeVar("_T")

_HEALTH_TIMEOUT_S: Final = 10.0
_RETRY_STATUSES: Final = frozenset({408, 425, 429})
_BODY_EXCERPT_CHARS: Final = 300


class FaceSwapRequest(BaseModel):
    """The seed's request body for ``POST /process``."""

    source_url: str
    target_url: str
    resolution: str = "1024x1024"
    model: str = "inswapper_128_fp16"


class FaceSwapResponse(BaseModel):
    """The seed's response body: ``status`` is ``success`` or ``failed``."""

    model_config = ConfigDict(extra="ignore")

    status: str
    output_path: str | None = None
    processing_time: float | None = None
    error: str | None = None
    job_id: str | None = None
    metadata: dict[str, Any] | None = Field(default=None)


def resolve_output_path(output_path: str, shared_dir: Path) -> Path:
    """The real path of the service's result, refused unless it is a file inside ``shared_dir``.

    Accepted forms: an absolute path inside ``shared_dir``, or a path relative to it, with
    or without a leading ``/`` (the seed's form, ``/outputs/x.jpg``, appended to the
    service's folder). ``..`` is refused outright; symlinks are followed and the target
    must still be inside; an absolute path that exists outside (``/etc/passwd``) is
    refused. Raises JobFailed ``unsafe_output_path`` or ``facefusion_no_output``.
    """
    root = shared_dir.resolve()
    if not output_path or "\x00" in output_path or ".." in Path(output_path).parts:
        raise _unsafe(output_path)
    given = Path(output_path)
    candidates = [given] if given.is_absolute() and given.is_relative_to(root) else []
    candidates.append(root / output_path.lstrip("/"))
    for candidate in candidates:
        try:
            resolved = candidate.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, RuntimeError):  # a symlink loop
            raise _unsafe(output_path) from None
        if not resolved.is_relative_to(root):
            raise _unsafe(output_path)
        if not resolved.is_file():
            raise JobFailed(
                f"the FaceFusion service's output {output_path!r} is not a file", code="facefusion_no_output"
            )
        return resolved
    if given.is_absolute() and not given.is_relative_to(root) and os.path.lexists(given):
        raise _unsafe(output_path)  # names a real file outside, not a missing one inside
    raise JobFailed(
        f"the FaceFusion service reported {output_path!r}, which does not exist in {root}",
        code="facefusion_no_output",
    )


def _unsafe(output_path: str) -> JobFailed:
    return JobFailed(
        f"the FaceFusion service's output_path {output_path[:200]!r} is outside FACE_SWAP_SHARED_DIR",
        code="unsafe_output_path",
    )


class FaceFusionApiEngine(FaceSwapEngineBase):
    """Face swaps through the seed's FaceFusion HTTP service."""

    name = "facefusion_api"
    supported_models: frozenset[str] = ENGINE_MODELS["facefusion_api"]

    def __init__(
        self,
        settings: Settings,
        fetcher: SafeFetcher | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_base_s: float = 1.0,
    ) -> None:
        """``transport`` and a short ``backoff_base_s`` are for tests; production uses the
        network and the seed's 1 s, 2 s, 4 s backoff."""
        super().__init__(settings, fetcher)
        self.base_url = settings.face_swap_api_url.rstrip("/")
        self.shared_dir = Path(settings.face_swap_shared_dir or settings.data_dir / "facefusion")
        self.timeout_s = settings.face_swap_timeout
        self.attempts = settings.face_swap_retry_count
        self.backoff_base_s = backoff_base_s
        self._transport = transport

    def _client(self, timeout_s: float) -> httpx.AsyncClient:
        # One client per job: nothing to keep between jobs, and no event-loop affinity.
        return httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=self._transport)

    async def health(self) -> dict[str, Any]:
        """The service's own health answer, or why it could not be had."""
        try:
            upstream = await self._check_health()
        except UpstreamUnavailable as exc:
            return {"status": "unavailable", "engine": self.name, "url": self.base_url, "error": exc.message}
        return {"status": "available", "engine": self.name, "url": self.base_url, "upstream": upstream}

    async def _check_health(self) -> Any:
        try:
            async with self._client(min(_HEALTH_TIMEOUT_S, self.timeout_s)) as client:
                response = await client.get("/health")
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"FaceFusion service at {self.base_url} is not reachable: {type(exc).__name__}: {exc}",
                code="facefusion_unavailable",
            ) from exc
        if response.status_code != 200:
            raise UpstreamUnavailable(
                f"FaceFusion service health check answered {response.status_code}: "
                f"{response.text[:_BODY_EXCERPT_CHARS]}",
                code="facefusion_unavailable",
                details={"upstream_status": response.status_code},
            )
        try:
            return response.json()
        except ValueError:
            return response.text[:_BODY_EXCERPT_CHARS]

    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        request: FaceSwapInput = job.metadata["request"]
        self.require_model(request, self.supported_models, "the FaceFusion service")
        if request.face_selector != "largest":
            raise JobFailed(
                "the FaceFusion service swaps the largest face only (face_selector)",
                code="option_not_supported",
            )
        progress(Progress(value=0, max=2, stage="health"))
        await _until_cancelled(self._check_health(), cancel)
        progress(Progress(value=1, max=2, stage="swap"))
        body = FaceSwapRequest(
            source_url=request.source_url,
            target_url=request.target_url,
            resolution=request.resolution,
            model=request.model,
        )
        response = await _until_cancelled(self._process(body), cancel)
        output = await asyncio.to_thread(self._collect_output, response, job.workdir)
        progress(Progress(value=2, max=2, stage="finished"))
        return EngineResult(
            outputs=[output],
            metadata={
                "engine": self.name,
                "model": request.model,
                "upstream_job_id": response.job_id,
                "upstream_processing_time_s": response.processing_time,
            },
        )

    async def _process(self, body: FaceSwapRequest) -> FaceSwapResponse:
        """POST /process with the seed's retry policy; returns a successful response."""
        last_error = ""
        async with self._client(self.timeout_s) as client:
            for attempt in range(self.attempts):
                if attempt:
                    await asyncio.sleep(self.backoff_base_s * 2 ** (attempt - 1))
                try:
                    response = await client.post("/process", json=body.model_dump())
                except httpx.TimeoutException:
                    last_error = f"no answer within FACE_SWAP_TIMEOUT={self.timeout_s:g}s"
                    log_event(
                        _logger, "facefusion_api_retry", attempt=attempt + 1, error=last_error, level=30
                    )
                    continue
                except httpx.TransportError as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                    log_event(
                        _logger, "facefusion_api_retry", attempt=attempt + 1, error=last_error, level=30
                    )
                    continue
                if response.status_code >= 500 or response.status_code in _RETRY_STATUSES:
                    last_error = f"HTTP {response.status_code}: {response.text[:_BODY_EXCERPT_CHARS]}"
                    log_event(
                        _logger, "facefusion_api_retry", attempt=attempt + 1, error=last_error, level=30
                    )
                    continue
                return self._parse(response)
        raise UpstreamUnavailable(
            f"FaceFusion service failed {self.attempts} attempt(s); last: {last_error}",
            code="facefusion_unavailable",
            details={"attempts": self.attempts, "last_error": last_error},
        )

    @staticmethod
    def _parse(response: httpx.Response) -> FaceSwapResponse:
        excerpt = response.text[:_BODY_EXCERPT_CHARS]
        if response.status_code != 200:
            raise JobFailed(
                f"FaceFusion service refused the request (HTTP {response.status_code}): {excerpt}",
                code="facefusion_rejected",
                details={"upstream_status": response.status_code, "upstream_body": excerpt},
            )
        try:
            parsed = FaceSwapResponse.model_validate_json(response.content)
        except ValidationError:
            raise JobFailed(
                f"FaceFusion service answered something that is not a FaceSwapResponse: {excerpt}",
                code="facefusion_bad_response",
            ) from None
        if parsed.status != "success":
            # A missing face gets the code every engine gives it, not a generic failure.
            raise JobFailed(
                f"FaceFusion service failed the swap: {parsed.error or parsed.status}",
                code=face_error_code(parsed.error or "") or "facefusion_failed",
                details={"upstream_job_id": parsed.job_id, "upstream_error": parsed.error},
            )
        if not parsed.output_path:
            raise JobFailed(
                "FaceFusion service reported success without an output_path", code="facefusion_no_output"
            )
        return parsed

    def _collect_output(self, response: FaceSwapResponse, workdir: Path) -> EngineOutput:
        """Move the service's result into the work folder and describe it by its bytes."""
        assert response.output_path is not None
        source = resolve_output_path(response.output_path, self.shared_dir)
        is_video = (response.metadata or {}).get("file_type") == "video"
        if is_video:
            content_type = "video/mp4"
        else:
            try:
                kind, content_type = sniff_kind(source)
            except UnsafeInput:
                raise JobFailed(
                    "the FaceFusion service's output is neither an image nor a video we can store",
                    code="facefusion_no_output",
                ) from None
            is_video = kind == "video"
        destination = workdir / f"result{MEDIA_EXTENSIONS.get(content_type, source.suffix)}"
        shutil.move(source, destination)
        return describe_output(destination, content_type, is_video=is_video)


async def _until_cancelled(work: Awaitable[_T], cancel: asyncio.Event) -> _T:
    """Await ``work`` unless ``cancel`` is set first; then stop waiting and raise JobCancelled."""
    work_future = asyncio.ensure_future(work)
    cancel_wait = asyncio.ensure_future(cancel.wait())
    try:
        done, _ = await asyncio.wait({work_future, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work_future.cancel()  # the worker gave up (its timeout): stop the HTTP call too
        raise
    finally:
        cancel_wait.cancel()
    if work_future in done:
        return work_future.result()
    work_future.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work_future
    raise JobCancelled("task cancelled while the FaceFusion service worked")
