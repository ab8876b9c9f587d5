"""The runner's HTTP server: the Cloud Tasks push endpoint, ops routes, local results.

Routes (``ROUTES``, the one table the dev server forwards by):
  POST /internal/tasks/run          Cloud Tasks push (OIDC-verified in push mode)
  GET  /api/health, /api/status     liveness and component health
  GET  /api/runner/status           worker state (slots, in-flight tasks)
  GET  /api/runner/health           engines, storage and worker (the console's admin view)
  POST /api/face-swap/process       synchronous swap, bypassing the queue
  GET  /api/face-swap/health
  GET  /api/comfyui-queue-status, /api/comfyui-system-stats; POST /api/comfyui-interrupt
  GET  /results/{key}               results of the `local` storage provider

Endpoints are module-level functions that find the runner's state on ``request.app``;
errors become responses in one place, Starlette's exception handlers (``EXCEPTION_HANDLERS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpu_runner.engines.base import Engine
from gpu_runner.sources import HttpTaskSource, StoreTaskSource, TaskSource
from gpu_runner.worker import Worker
from shared.auth import Principal, authenticate, keys_need_io
from shared.dispatch.base import NoopDispatcher
from shared.errors import (
    ComfySwapError,
    Conflict,
    Forbidden,
    NotFound,
    UpstreamUnavailable,
    ValidationFailed,
)
from shared.logs import configure_logging, get_logger, log_event
from shared.ratelimit import RateLimiter
from shared.request_guard import body_too_large, normalise_path
from shared.settings import Settings
from shared.storage.base import StoredObject
from shared.storage.local import RESULT_HEADERS, LocalStorage
from shared.store import TaskStore, make_task_store
from shared.tasks import Task, utcnow

__all__ = ["EXCEPTION_HANDLERS", "ROUTES", "RunnerState", "create_app"]

logger = get_logger(__name__)


def task_source(settings: Settings, store: TaskStore) -> TaskSource:
    """Where this runner pulls from (PULL_SOURCE): the store it writes to when that is the
    embedded SQLite one (the API is a hop with nothing to add), else the task API."""
    embedded = settings.task_store == "sqlite"
    if settings.pull_source == "store" or (settings.pull_source == "auto" and embedded):
        return StoreTaskSource(store, settings)
    return HttpTaskSource(settings.task_api_url, api_key=settings.runner_api_key)


class RunnerState:
    """Everything the routes share: settings, store, engines, storage, the worker."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: TaskStore | None = None,
        engines: dict[str, Engine] | None = None,
        pull: bool | None = None,
    ) -> None:
        from shared.storage import make_storage_chain

        self.settings = settings
        self.store = store or make_task_store(settings)
        self.engines = engines if engines is not None else build_engines(settings)
        self.storage = make_storage_chain(settings)
        self.local_results = LocalStorage.from_settings(settings)
        self.pull = settings.dispatch_mode == "pull" if pull is None else pull
        source = task_source(settings, self.store) if self.pull else None
        from shared.webhooks import WebhookNotifier

        self.rate_limiter = RateLimiter.from_settings(settings)
        self.webhooks = WebhookNotifier(settings, self.store)
        self.worker = Worker(
            settings, self.store, self.engines, self.upload, source=source, on_finished=self.webhooks.notify
        )
        self.worker.discard_result = self.storage.delete
        self.started_at = time.time()
        # One certificate cache per process (push mode): Google's keys are fetched once per max-age.
        self.google_certs: Any = None
        if settings.dispatch_mode == "push" and settings.cloud_tasks_invoker_email:
            from shared.oidc import GoogleCertsCache

            self.google_certs = GoogleCertsCache(settings.google_oidc_certs_url)
        self._pull_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        from gpu_runner.reaper import Reaper

        push = settings.dispatch_mode == "push" and not self.pull
        self.reaper = Reaper(settings, self.store, self.storage, push=push)
        self._reaper_task: asyncio.Task[None] | None = None
        if push:
            self.worker.on_requeued = self.reaper.requeued

    def upload(self, path: Path, key: str, content_type: str) -> StoredObject:
        return self.storage.upload(path, key, content_type)

    async def start(self) -> None:
        for engine in self.engines.values():
            await engine.start()
        if self.pull:
            self._pull_task = asyncio.create_task(self.worker.run_pull_loop())
        self._beat_task = asyncio.create_task(self._report_forever())
        self._reaper_task = asyncio.create_task(self.reaper.run_forever())
        log_event(
            logger,
            "runner_started",
            worker_id=self.worker.worker_id,
            mode="pull" if self.pull else "push",
            engines=sorted(self.engines),
        )

    async def _report_forever(self, every_s: float = 60.0) -> None:
        """``runner_heartbeat`` and ``queue_stats`` log events: the runner-down and backlog
        alerts (infra/terraform/monitoring.tf) are log-based metrics over these."""
        while True:
            log_event(logger, "runner_heartbeat", **self.worker.snapshot())
            try:
                stats = await asyncio.to_thread(self.store.queue_stats)
                log_event(logger, "queue_stats", queue_length=stats.queue_length, **stats.model_dump())
            except Exception as exc:
                log_event(logger, "queue_stats_failed", error=repr(exc), level=logging.WARNING)
            await asyncio.sleep(every_s)

    async def stop(self) -> None:
        for background in (self._beat_task, self._reaper_task):
            if background is not None:
                background.cancel()
        await self.worker.drain(grace_s=self.settings.shutdown_grace_s)
        if self._pull_task is not None:
            self._pull_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pull_task


def build_engines(settings: Settings) -> dict[str, Engine]:
    """One engine per environment this runner serves; heavy imports only when chosen."""
    engines: dict[str, Engine] = {}
    if "face_swap" in settings.environments:
        from gpu_runner.engines.faceswap import make_face_swap_engine

        engines["face_swap"] = make_face_swap_engine(settings)
    if "comm" in settings.environments:
        from gpu_runner.engines.comfyui import ComfyUIEngine
        from shared.safe_fetch import SafeFetcher
        from shared.video import check_video

        engines["comm"] = ComfyUIEngine(
            settings, SafeFetcher.from_settings(settings, check_video=check_video)
        )
    return engines


# --- request helpers -------------------------------------------------------------------
def runner_of(request: Request) -> RunnerState:
    state: RunnerState = request.app.state.runner
    return state


async def caller(request: Request) -> Principal:
    """Who sent this request. With API_KEYS_FILE the check stats (and on a change reads)
    the file, so it runs in a thread: a slow disk must not stall the heartbeats."""
    settings = runner_of(request).settings
    if keys_need_io(settings):
        return await asyncio.to_thread(authenticate, request.headers, settings)
    return authenticate(request.headers, settings)


async def client_principal(request: Request) -> Principal:
    """The caller of a client route: a client or admin key, within its rate limit (the same
    per-owner buckets as the API's, so the runner's routes are no way around them)."""
    runner = runner_of(request)
    principal = await caller(request)
    principal.require_client()
    runner.rate_limiter.check(principal)
    return principal


def visible_owner(principal: Principal) -> str | None:
    """None (everything) for an admin, else the caller's own owner name."""
    return None if principal.is_admin else principal.owner


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise ValidationFailed("body", "not valid JSON") from None


def comfyui_engine(request: Request) -> Any:
    engine = runner_of(request).engines.get("comm")
    if engine is None:
        raise UpstreamUnavailable("this runner serves no ComfyUI environment", code="no_engine")
    return engine


# --- endpoints -------------------------------------------------------------------------
async def health(request: Request) -> Response:
    return JSONResponse({"status": "healthy", "timestamp": utcnow().isoformat()})


async def status(request: Request) -> Response:
    """Component health. Where things live (storage roots and buckets, the ComfyUI URL,
    upstream error text) is for admins; a client sees each component's state."""
    principal = await client_principal(request)
    runner = runner_of(request)
    engines: dict[str, Any] = {}
    for name, engine in runner.engines.items():
        try:
            engines[name] = await asyncio.wait_for(engine.health(), timeout=5)
        except Exception as exc:
            engines[name] = {"status": "error", "error": str(exc)}
    # Each provider's check is a network call (a bucket reload, head_bucket with botocore's
    # retries, a Cloudflare GET): in a thread, never on the loop the heartbeats run on.
    storage = await asyncio.to_thread(runner.storage.health)
    if not principal.is_admin:
        engines = {name: {"status": report.get("status")} for name, report in engines.items()}
        storage = {"status": storage.get("status")}
    return JSONResponse(
        {
            "runner": "healthy",
            "engines": engines,
            "storage": storage,
            "worker": runner.worker.snapshot(owner=visible_owner(principal)),
            "uptime_s": round(time.time() - runner.started_at, 1),
        }
    )


async def runner_status(request: Request) -> Response:
    principal = await client_principal(request)
    return JSONResponse(runner_of(request).worker.snapshot(owner=visible_owner(principal)))


async def push(request: Request) -> Response:
    """One Cloud Tasks delivery: claim the task and run it; 429/503 make Cloud Tasks retry."""
    runner = runner_of(request)
    settings = runner.settings
    if runner.pull:
        # A pulling runner claims its own work; a push here could only run a task out of turn.
        raise Forbidden(
            "this runner pulls its work (DISPATCH_MODE=pull); it takes no pushes", code="push_disabled"
        )
    if settings.dispatch_mode == "push" and settings.cloud_tasks_invoker_email:
        from shared.oidc import identity_header, platform_verifies_tokens, verify_cloud_tasks_token

        # Google's certificates may be fetched (sync HTTP) and the signature checked: a thread.
        await asyncio.to_thread(
            verify_cloud_tasks_token,
            identity_header(request.headers),
            audience=settings.runner_oidc_audience or settings.effective_runner_url,
            service_account_email=settings.cloud_tasks_invoker_email,
            certs=runner.google_certs,
            platform_verified=platform_verifies_tokens(settings),
        )
    else:
        (await caller(request)).require_runner()
    try:
        body = json.loads(await request.body())
        task_id = str(body["task_id"])
    except (ValueError, KeyError, TypeError):
        raise ValidationFailed("task_id", 'body must be {"task_id": ...}') from None
    code, payload = await runner.worker.run_pushed(task_id)
    headers = {"Retry-After": str(payload["retry_after_s"])} if "retry_after_s" in payload else {}
    return JSONResponse(payload, status_code=code, headers=headers)


async def results(request: Request) -> Response:
    """A `local` result: to anyone with its signed, unexpired URL, else to its task's owner
    (by API key). Anything else is the same 404 as a missing file: nothing to probe."""
    runner = runner_of(request)
    key = request.path_params["key"]
    params = request.query_params
    path = runner.local_results.signed_file(key, params.get("expires"), params.get("signature"))
    if path is None:
        principal = await caller(request)
        runner.rate_limiter.check(principal)
        task = await asyncio.to_thread(runner.store.get, key.split("/", 1)[0])
        if task is None or not principal.can_see(task.owner):
            raise NotFound("no such result", code="result_not_found")
        path = runner.local_results.path_for("results/" + key)
        if not path.is_file():
            raise NotFound("no such result", code="result_not_found")
    return FileResponse(path, headers=RESULT_HEADERS)


async def face_swap_process(request: Request) -> Response:
    """Swap now, without the queue; bounded by FACE_SWAP_TIMEOUT, same validation."""
    principal = await client_principal(request)
    runner = runner_of(request)
    engine = runner.engines.get("face_swap")
    if engine is None:
        raise UpstreamUnavailable("this runner serves no face_swap environment", code="no_engine")
    body = await json_body(request)
    from shared.service import TaskService

    service = TaskService(runner.settings, runner.store, NoopDispatcher())
    create_request = service.parse_create(body, face_swap_shortcut=True)
    task = service.build_task(create_request, principal)
    started = time.perf_counter()
    # Counted like a claimed task: a full runner answers 429 instead of running it anyway.
    async with runner.worker.direct_job():
        result = await asyncio.wait_for(
            _run_direct(runner, engine, task), timeout=runner.settings.face_swap_timeout
        )
    return JSONResponse(
        {
            "status": "success",
            "result": {"output_url": result["url"], **result},
            "processing_time": round(time.perf_counter() - started, 3),
            "job_id": task.taskId,
        }
    )


async def face_swap_health(request: Request) -> Response:
    engine = runner_of(request).engines.get("face_swap")
    if engine is None:
        return JSONResponse({"status": "unavailable", "reason": "no face_swap engine"}, status_code=503)
    health_body = await engine.health()
    return JSONResponse(health_body, status_code=200 if health_body.get("status") == "available" else 503)


async def comfyui_queue_status(request: Request) -> Response:
    await client_principal(request)
    return JSONResponse(await comfyui_engine(request).queue_status())


async def comfyui_system_stats(request: Request) -> Response:
    await client_principal(request)
    return JSONResponse(await comfyui_engine(request).system_stats())


async def comfyui_interrupt(request: Request) -> Response:
    """``?task_id=``: stop one of your own tasks running here (it ends CANCELLED and the
    runner interrupts its ComfyUI prompt). Without it, or by ``prompt_id``, ComfyUI's own
    interrupt stops whatever runs, any tenant's work: an admin's call only."""
    principal = await client_principal(request)
    runner = runner_of(request)
    task_id = request.query_params.get("task_id")
    if task_id:
        task = await asyncio.to_thread(runner.store.get, task_id)
        if task is None or not principal.can_see(task.owner):
            raise NotFound(f"task {task_id} not found", code="task_not_found", details={"task_id": task_id})
        if runner.worker.owner_of(task_id) is None or task.environment not in runner.engines:
            raise Conflict(f"task {task_id} is not running on this runner", code="task_not_running")
        cancelled = await asyncio.to_thread(runner.store.cancel, task_id)
        log_event(logger, "task_interrupted", task_id=task_id, owner=principal.owner)
        return JSONResponse({"interrupted": True, "task_id": task_id, "status": cancelled.status.value})
    principal.require_admin()
    return JSONResponse(await comfyui_engine(request).interrupt(request.query_params.get("prompt_id")))


ROUTES = [
    Route("/api/health", health),
    Route("/api/status", status),
    Route("/api/runner/status", runner_status),
    # /api/status of the API host is get_task's; through the one host the runner's is here.
    Route("/api/runner/health", status),
    Route("/internal/tasks/run", push, methods=["POST"]),
    Route("/results/{key:path}", results),
    Route("/api/face-swap/process", face_swap_process, methods=["POST"]),
    Route("/api/face-swap/health", face_swap_health),
    Route("/api/comfyui-queue-status", comfyui_queue_status),
    Route("/api/comfyui-system-stats", comfyui_system_stats),
    Route("/api/comfyui-interrupt", comfyui_interrupt, methods=["POST"]),
]


# --- errors to responses -----------------------------------------------------------------
def error_response(exc: ComfySwapError) -> JSONResponse:
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)  # RateLimited, RunnerBusy
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    return JSONResponse(
        {"success": False, "error": exc.to_dict(), "detail": exc.message},
        status_code=exc.http_status,
        headers=headers,
    )


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ComfySwapError)
    return error_response(exc)


async def _timed_out(request: Request, exc: Exception) -> Response:
    # Only the direct swap waits with a deadline of its own (FACE_SWAP_TIMEOUT).
    return error_response(UpstreamUnavailable("the swap took longer than FACE_SWAP_TIMEOUT", code="timeout"))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    codes = {404: "route_not_found", 405: "method_not_allowed"}
    error = ComfySwapError(
        f"{exc.detail}: {request.method} {request.url.path}", code=codes.get(exc.status_code, "http_error")
    )
    return JSONResponse(
        {"success": False, "error": error.to_dict(), "detail": error.message},
        status_code=exc.status_code,
        headers=exc.headers,
    )


EXCEPTION_HANDLERS = {ComfySwapError: _service_error, TimeoutError: _timed_out, HTTPException: _http_error}


class RequestGuard:
    """Before routing and authentication: the path normalised (``shared.request_guard``),
    the body capped at MAX_REQUEST_BYTES (a declared length at once, a chunked body while it
    is read, never more than the cap in memory); and any crash one JSON log line and a 500
    body, instead of Starlette's multi-line traceback on stderr."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            path = normalise_path(scope["path"])
            body = await self._read_body(scope, receive)
        except ComfySwapError as exc:
            await error_response(exc)(scope, receive, send)
            return
        if body is None:  # the client went away
            return
        scope = {**scope, "path": path, "raw_path": quote(path).encode()}
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        response_started = False

        async def send_tracked(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, send_tracked)
        except Exception:
            logger.exception("unhandled error", extra={"event": "request_crashed", "path": path})
            if not response_started:
                crash = ComfySwapError("internal error; the request changed nothing it did not report")
                await error_response(crash)(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ValidationFailed("Content-Length", "must be a whole number of bytes")
            if int(declared) > limit:
                raise body_too_large(limit, int(declared))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def create_app(settings: Settings, *, state: RunnerState | None = None) -> Starlette:
    configure_logging(settings.log_level)
    runner = state or RunnerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()

    app = Starlette(
        routes=ROUTES,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(RequestGuard, max_body_bytes=settings.max_request_bytes)],
        lifespan=lifespan,
    )
    app.state.runner = runner
    return app


async def _run_direct(runner: RunnerState, engine: Engine, task: Task) -> dict[str, Any]:
    """The direct route: prepare, run under the engine slot, upload; no task document."""
    workdir = runner.settings.data_dir / "work" / task.taskId
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    try:
        job = await engine.prepare(task, workdir)
        async with runner.worker.slots["face_swap"]:
            result = await engine.run(job, lambda progress: None, asyncio.Event())
        output = result.outputs[0]
        from shared.storage.base import result_key

        key = result_key(task.taskId, 0, output.content_type, suffix=output.path.suffix or None)
        stored = await asyncio.to_thread(runner.upload, output.path, key, output.content_type)
        return {
            "url": stored.url,
            "provider": stored.provider,
            "content_type": stored.content_type,
            "width": output.width,
            "height": output.height,
            "duration": output.duration,
        }
    finally:
        # A video job leaves thousands of frames: removing them takes seconds, off the loop
        # (as the worker does), or every held task's heartbeat waits for it.
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True))
