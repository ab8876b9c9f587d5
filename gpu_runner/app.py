"""The runner's HTTP server: the Cloud Tasks push endpoint, ops routes, local results.

Routes:
  POST /internal/tasks/run          Cloud Tasks push (OIDC-verified in push mode)
  GET  /api/health, /api/status     liveness and component health
  GET  /api/runner/status           worker state (slots, in-flight tasks)
  POST /api/face-swap/process       synchronous swap, bypassing the queue
  GET  /api/face-swap/health, /api/face-swap/workflows
  GET  /api/comfyui-queue-status, /api/comfyui-system-stats; POST /api/comfyui-interrupt
  GET  /results/{key}               results of the `local` storage provider
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from gpu_runner.engines.base import Engine
from gpu_runner.worker import HttpTaskSource, Worker
from shared.auth import authenticate
from shared.dispatch.base import NoopDispatcher
from shared.errors import ComfySwapError, NotFound, RateLimited, UpstreamUnavailable, ValidationFailed
from shared.logs import configure_logging, get_logger, log_event
from shared.settings import Settings
from shared.storage.base import StoredObject
from shared.storage.local import LocalStorage
from shared.store import TaskStore, make_task_store
from shared.tasks import Task, utcnow
from shared.workflows import TEMPLATES, FaceSwapInput

__all__ = ["RunnerState", "create_app"]

logger = get_logger(__name__)


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
        self.local_results = LocalStorage(
            settings.data_dir / "results", settings.effective_local_storage_base_url
        )
        self.pull = settings.dispatch_mode == "pull" if pull is None else pull
        source = HttpTaskSource(settings.task_api_url, api_key=settings.runner_api_key) if self.pull else None
        from shared.webhooks import WebhookNotifier

        self.webhooks = WebhookNotifier(settings, self.store)
        self.worker = Worker(
            settings, self.store, self.engines, self.upload, source=source, on_finished=self.webhooks.notify
        )
        self.started_at = time.time()
        # One certificate cache per process (push mode): Google's keys are fetched once per max-age.
        self.google_certs: Any = None
        if settings.dispatch_mode == "push" and settings.cloud_tasks_invoker_email:
            from shared.oidc import GoogleCertsCache

            self.google_certs = GoogleCertsCache(settings.google_oidc_certs_url)
        self._pull_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None

    def upload(self, path: Path, key: str, content_type: str) -> StoredObject:
        return self.storage.upload(path, key, content_type)

    async def start(self) -> None:
        for engine in self.engines.values():
            await engine.start()
        if self.pull:
            self._pull_task = asyncio.create_task(self.worker.run_pull_loop())
        self._beat_task = asyncio.create_task(self._report_forever())
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
                log_event(logger, "queue_stats_failed", error=repr(exc), level=30)
            await asyncio.sleep(every_s)

    async def stop(self) -> None:
        if self._beat_task is not None:
            self._beat_task.cancel()
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

        engines["comm"] = ComfyUIEngine(settings, SafeFetcher.from_settings(settings))
    return engines


def _error(exc: ComfySwapError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after_s)
    return JSONResponse(
        {"success": False, "error": exc.to_dict(), "detail": exc.message},
        status_code=exc.http_status,
        headers=headers,
    )


def create_app(settings: Settings, *, state: RunnerState | None = None) -> Starlette:
    configure_logging(settings.log_level)
    runner = state or RunnerState(settings)

    def require_client(request: Request) -> None:
        authenticate(request.headers, settings).require_client()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "healthy", "timestamp": utcnow().isoformat()})

    async def status(request: Request) -> Response:
        require_client(request)
        engines = {}
        for name, engine in runner.engines.items():
            try:
                engines[name] = await asyncio.wait_for(engine.health(), timeout=5)
            except Exception as exc:
                engines[name] = {"status": "error", "error": str(exc)}
        return JSONResponse(
            {
                "runner": "healthy",
                "engines": engines,
                "storage": runner.storage.health(),
                "worker": runner.worker.snapshot(),
                "uptime_s": round(time.time() - runner.started_at, 1),
            }
        )

    async def runner_status(request: Request) -> Response:
        require_client(request)
        return JSONResponse(runner.worker.snapshot())

    async def push(request: Request) -> Response:
        if settings.dispatch_mode == "push" and settings.cloud_tasks_invoker_email:
            from shared.oidc import verify_cloud_tasks_token

            verify_cloud_tasks_token(
                request.headers.get("Authorization"),
                audience=settings.runner_oidc_audience or settings.effective_runner_url,
                service_account_email=settings.cloud_tasks_invoker_email,
                certs=runner.google_certs,
            )
        elif settings.dispatch_mode == "push":
            authenticate(request.headers, settings).require_runner()
        try:
            body = json.loads(await request.body())
            task_id = str(body["task_id"])
        except (ValueError, KeyError, TypeError):
            raise ValidationFailed("task_id", 'body must be {"task_id": ...}') from None
        code, payload = await runner.worker.run_pushed(task_id)
        headers = {"Retry-After": str(payload["retry_after_s"])} if "retry_after_s" in payload else {}
        return JSONResponse(payload, status_code=code, headers=headers)

    async def results(request: Request) -> Response:
        path = runner.local_results.path_for("results/" + request.path_params["key"])
        if not path.is_file():
            raise NotFound("no such result", code="result_not_found")
        return FileResponse(path)

    async def face_swap_process(request: Request) -> Response:
        """Swap now, without the queue; bounded by FACE_SWAP_TIMEOUT, same validation."""
        principal = authenticate(request.headers, settings)
        principal.require_client()
        engine = runner.engines.get("face_swap")
        if engine is None:
            raise UpstreamUnavailable("this runner serves no face_swap environment", code="no_engine")
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ValidationFailed("body", "not valid JSON") from None
        from shared.service import TaskService

        service = TaskService(settings, runner.store, NoopDispatcher())
        create_request = service.parse_create(body, face_swap_shortcut=True)
        task = service.build_task(create_request, principal)
        if runner.worker.busy:
            raise RateLimited("all engine slots are busy", retry_after_s=5, code="runner_busy")
        started = time.perf_counter()
        result = await asyncio.wait_for(_run_direct(runner, engine, task), timeout=settings.face_swap_timeout)
        return JSONResponse(
            {
                "status": "success",
                "result": {"output_url": result["url"], **result},
                "processing_time": round(time.perf_counter() - started, 3),
                "job_id": task.taskId,
            }
        )

    async def face_swap_health(request: Request) -> Response:
        engine = runner.engines.get("face_swap")
        if engine is None:
            return JSONResponse({"status": "unavailable", "reason": "no face_swap engine"}, status_code=503)
        health_body = await engine.health()
        return JSONResponse(health_body, status_code=200 if health_body.get("status") == "available" else 503)

    async def face_swap_workflows(request: Request) -> Response:
        return JSONResponse(
            {
                "workflows": {name: template.describe() for name, template in TEMPLATES.items()},
                "face_swap": FaceSwapInput.model_json_schema(),
            }
        )

    async def comfyui_call(request: Request) -> Response:
        require_client(request)
        engine = runner.engines.get("comm")
        if engine is None:
            raise UpstreamUnavailable("this runner serves no ComfyUI environment", code="no_engine")
        action = request.url.path.rsplit("/", 1)[-1]
        if action == "comfyui-queue-status":
            return JSONResponse(await engine.queue_status())  # type: ignore[attr-defined]
        if action == "comfyui-system-stats":
            return JSONResponse(await engine.system_stats())  # type: ignore[attr-defined]
        prompt_id = request.query_params.get("prompt_id")
        return JSONResponse(await engine.interrupt(prompt_id))  # type: ignore[attr-defined]

    def wrap(handler: Any) -> Any:
        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except ComfySwapError as exc:
                return _error(exc)
            except TimeoutError:
                return _error(
                    UpstreamUnavailable("the swap took longer than FACE_SWAP_TIMEOUT", code="timeout")
                )

        return guarded

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()

    routes = [
        Route("/api/health", wrap(health)),
        Route("/api/status", wrap(status)),
        Route("/api/runner/status", wrap(runner_status)),
        Route("/internal/tasks/run", wrap(push), methods=["POST"]),
        Route("/results/{key:path}", wrap(results)),
        Route("/api/face-swap/process", wrap(face_swap_process), methods=["POST"]),
        Route("/api/face-swap/health", wrap(face_swap_health)),
        Route("/api/face-swap/workflows", wrap(face_swap_workflows)),
        Route("/api/comfyui-queue-status", wrap(comfyui_call)),
        Route("/api/comfyui-system-stats", wrap(comfyui_call)),
        Route("/api/comfyui-interrupt", wrap(comfyui_call), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.runner = runner
    return app


async def _run_direct(runner: RunnerState, engine: Engine, task: Task) -> dict[str, Any]:
    """The direct route: prepare, run under the engine slot, upload; no task document."""
    workdir = runner.settings.data_dir / "work" / task.taskId
    workdir.mkdir(parents=True, exist_ok=True)
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
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
