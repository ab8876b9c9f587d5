"""The runner's worker: claim, prepare, run, upload, report, as a pipeline.

Three stages overlap so the engine never waits on the network:

* claiming and ``prepare`` (downloads) of the next task run while the current task holds
  the engine slot (``prefetch`` tasks may be held ahead of the slots);
* the engine slot (one per engine by default) is held only for ``Engine.run``;
* uploads and the final status write happen after the slot is released.

Every held task keeps its lease alive by heartbeat. A lost lease (the client cancelled,
or the reaper gave the task to another runner) stops the engine and writes nothing, so a
task never ends with two results. SIGTERM drains: no new claims, in-flight tasks get a
grace period, the rest are released for another runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from gpu_runner.engines.base import Engine, EngineResult, PreparedJob
from shared.errors import (
    ComfySwapError,
    Conflict,
    JobCancelled,
    JobFailed,
    NotFound,
    RateLimited,
    RunnerBusy,
    TransientError,
    UpstreamUnavailable,
)
from shared.inputs import InputStore, drop_task_inputs, input_refs, make_input_store
from shared.logs import bind_task, get_logger, log_event, log_task_claimed, unbind_task
from shared.settings import Settings
from shared.storage.base import StoredObject, result_key
from shared.store.base import TaskStore
from shared.store.notify import TaskChange
from shared.tasks import LEASED_STATUSES, Progress, Task, TaskStatus, utcnow

__all__ = ["HttpTaskSource", "StoreTaskSource", "TaskSource", "Uploader", "Worker"]

logger = get_logger(__name__)

Uploader = Callable[[Path, str, str], StoredObject]


class TaskSource(Protocol):
    async def next_task(self, *, worker_id: str, environments: list[str], wait_s: float) -> Task | None: ...

    async def close(self) -> None: ...


class HttpTaskSource:
    """Pull mode: claim through the fetch_task function (the seed's consumer endpoint)."""

    def __init__(self, task_api_url: str, *, api_key: str = "") -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._client = httpx.AsyncClient(base_url=task_api_url.rstrip("/"), headers=headers, timeout=60.0)

    async def next_task(self, *, worker_id: str, environments: list[str], wait_s: float) -> Task | None:
        params = {"worker_id": worker_id, "environments": ",".join(environments), "wait": str(wait_s)}
        try:
            response = await self._client.get("/comm/task/fetch", params=params, timeout=wait_s + 15.0)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"task API not reachable: {exc}", code="task_api_unavailable") from exc
        if response.status_code != 200:
            raise UpstreamUnavailable(
                f"task API answered {response.status_code}: {response.text[:300]}", code="task_api_error"
            )
        data = response.json().get("data")
        return Task.from_document(data) if data else None

    async def close(self) -> None:
        await self._client.aclose()


class StoreTaskSource:
    """Claims straight from the store (tests, and a runner co-located with its store)."""

    def __init__(self, store: TaskStore, lease_seconds: float) -> None:
        self._store = store
        self._lease_seconds = lease_seconds

    async def next_task(self, *, worker_id: str, environments: list[str], wait_s: float) -> Task | None:
        loop = asyncio.get_running_loop()
        published = asyncio.Event()

        def on_work(change: TaskChange) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under a late change
                loop.call_soon_threadsafe(published.set)

        deadline = time.monotonic() + wait_s
        unsubscribe = await asyncio.to_thread(self._store.subscribe_work, environments, on_work)
        try:
            while True:
                published.clear()
                task = await asyncio.to_thread(
                    self._store.claim_next,
                    worker_id=worker_id,
                    environments=environments,
                    lease_seconds=self._lease_seconds,
                )
                remaining = deadline - time.monotonic()
                if task is not None or remaining <= 0:
                    return task
                now = utcnow()
                wake_at = await asyncio.to_thread(self._store.next_wake_at, environments, now)
                if wake_at is not None:
                    remaining = min(remaining, max(0.0, (wake_at - now).total_seconds()) + 0.001)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(published.wait(), timeout=remaining)
        finally:
            unsubscribe()

    async def close(self) -> None:
        return None


@dataclasses.dataclass
class _Held:
    task_id: str
    cancel: asyncio.Event
    owner: str = ""
    lease_lost: bool = False
    progress: Progress | None = None
    progress_written: Progress | None = None
    in_engine: bool = False
    # Wakes the lease keeper: a change published by someone else, or progress it waits for.
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    taken: bool = False  # a published change says the task left this runner
    wants_progress: bool = False
    finishing: bool = False  # our own final write is under way: its change is not a loss
    marking_processing: bool = False  # the PROCESSING write has left
    # The asyncio task running process() (a pull-loop task or a push request): shutdown
    # cancels it, and its CancelledError path is the one place a task is released.
    job: asyncio.Task[Any] | None = None
    releasing: bool = False
    shutting_down: bool = False  # drain stopped it: give it back rather than record a cancel


# At shutdown, how long a stopped engine may take to return before its task is cancelled.
STOP_WAIT_S = 2.0


def default_worker_id(settings: Settings) -> str:
    return settings.runner_id or f"{socket.gethostname()}-{os.getpid()}"


# How long a job runs on the engine before the runner writes PROCESSING (see process()).
PROCESSING_WRITE_DELAY_S = 0.5


def retry_delay_s(attempt: int) -> float:
    """Exponential backoff between attempts: 2, 4, 8 ... capped at 60 s."""
    return float(min(60, 2 ** max(1, attempt)))


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        engines: dict[str, Engine],
        upload: Uploader,
        *,
        source: TaskSource | None = None,
        prefetch: int = 1,
        on_finished: Callable[[Task], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engines = engines
        self.upload = upload
        self.source = source
        self.worker_id = default_worker_id(settings)
        self.slots = {name: asyncio.Semaphore(settings.engine_slots) for name in engines}
        self.capacity = settings.engine_slots * max(1, len(engines)) + prefetch
        self._held = asyncio.Semaphore(self.capacity)
        self._held_count = 0
        self.in_flight: dict[str, _Held] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        # Set while the pull loop waits on fetch_task: a fetch in flight may still claim a
        # task for this runner, so drain lets it return before releasing and closing.
        self._fetching = False
        self._pull_wait_s = 0.0
        self._pull_stopped = asyncio.Event()
        self._on_finished = on_finished
        # Push mode: enqueue a task this runner put back to PENDING (released, or retried
        # after a transient error) at once, under its new dispatch generation. Pull mode
        # needs nothing: a waiting fetch wakes on the store's notification.
        self.on_requeued: Callable[[Task], None] | None = None
        # Removes a result object from every store (the storage chain's delete).
        self.discard_result: Callable[[str], object] | None = None
        self.work_root = settings.data_dir / "work"
        self.completed = 0
        self.failed = 0

    # --- state for routes ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._held_count >= self.capacity

    def snapshot(self, *, owner: str | None = None) -> dict[str, Any]:
        """The worker's state; with ``owner``, only that owner's in-flight task ids (another
        tenant's running task ids are theirs alone)."""
        in_flight = [
            task_id for task_id, held in self.in_flight.items() if owner is None or held.owner == owner
        ]
        return {
            "worker_id": self.worker_id,
            "draining": self.draining,
            "capacity": self.capacity,
            "held": self._held_count,
            "in_flight": sorted(in_flight),
            "slots": dict.fromkeys(self.engines, self.settings.engine_slots),
            "completed": self.completed,
            "failed": self.failed,
        }

    def owner_of(self, task_id: str) -> str | None:
        """The owner of a task this runner holds now, else None."""
        held = self.in_flight.get(task_id)
        return held.owner if held is not None else None

    @contextlib.asynccontextmanager
    async def direct_job(self) -> AsyncIterator[None]:
        """A hold for a job that bypasses the queue (the direct swap route): it counts
        against the same capacity as claimed tasks, and a full runner refuses at once."""
        if self.draining:
            raise RunnerBusy("the runner is draining", retry_after_s=10)
        if self.busy:
            raise RateLimited(
                f"all {self.capacity} places of this runner are taken", retry_after_s=5, code="runner_busy"
            )
        await self._held.acquire()
        self._held_count += 1
        try:
            yield
        finally:
            self._release_hold()

    # --- pull mode --------------------------------------------------------------------
    async def run_pull_loop(self, *, wait_s: float = 10.0) -> None:
        """Claim tasks while there is capacity; stops when ``draining`` is set."""
        assert self.source is not None, "pull mode needs a task source"
        # A fetch outliving this runner (killed -9) can still claim a task; keeping the wait
        # under half a lease bounds what such an orphaned claim costs.
        wait_s = min(wait_s, self.settings.lease_seconds / 2)
        self._pull_wait_s = wait_s
        try:
            await self._pull_until_draining(self.source, wait_s)
        finally:
            self._pull_stopped.set()

    async def _pull_until_draining(self, source: TaskSource, wait_s: float) -> None:
        failures = 0
        while not self.draining:
            await self._held.acquire()
            self._held_count += 1
            if self.draining:
                self._release_hold()
                break
            # An engine that cannot work (its models are missing) claims nothing meanwhile.
            environments = [name for name in sorted(self.engines) if self.engines[name].accepting_work]
            if not environments:
                self._release_hold()
                await asyncio.sleep(min(wait_s, 5.0))
                # health() re-checks (FaceFusion's model files, say) so work resumes once fixed.
                await asyncio.gather(*(engine.health() for engine in self.engines.values()))
                continue
            try:
                task = await self._fetch(source, environments, wait_s)
                failures = 0
            except ComfySwapError as exc:
                self._release_hold()
                if self.draining:
                    break
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log_event(
                    logger,
                    "fetch_failed",
                    code=exc.code,
                    error=exc.message,
                    retry_in_s=delay,
                    level=logging.WARNING,
                )
                await asyncio.sleep(delay)
                continue
            if task is None:
                self._release_hold()
                continue
            if self.draining:
                released = await asyncio.to_thread(
                    self.store.release, task.taskId, worker_id=self.worker_id, reason="draining"
                )
                await self._requeue(released)
                self._release_hold()
                break
            self._spawn(self.process(task, hold_acquired=True))

    async def _fetch(self, source: TaskSource, environments: list[str], wait_s: float) -> Task | None:
        self._fetching = True
        try:
            return await source.next_task(worker_id=self.worker_id, environments=environments, wait_s=wait_s)
        finally:
            self._fetching = False

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _release_hold(self) -> None:
        self._held_count -= 1
        self._held.release()

    # --- push mode --------------------------------------------------------------------
    async def run_pushed(self, task_id: str) -> tuple[int, dict[str, Any]]:
        """Handle one Cloud Tasks delivery; returns (HTTP status, body).

        2xx tells Cloud Tasks to stop; 429/503 make it retry later with backoff."""
        if self.draining:
            return 503, {"status": "draining", "retry_after_s": 10}
        if self.busy:
            return 429, {"status": "busy", "retry_after_s": 5}
        await self._held.acquire()
        self._held_count += 1
        try:
            task = await asyncio.to_thread(
                self.store.claim, task_id, worker_id=self.worker_id, lease_seconds=self.settings.lease_seconds
            )
        except NotFound:
            self._release_hold()
            log_event(logger, "push_unknown_task", task_id=task_id, level=logging.WARNING)
            return 200, {"status": "unknown_task"}
        except Conflict as exc:
            self._release_hold()
            if exc.code == "not_available_yet":
                # In retry backoff: Cloud Tasks delivers again after Retry-After.
                retry_after_s = int(exc.details.get("retry_after_s", 1))
                return 503, {"status": "not_available_yet", "retry_after_s": retry_after_s}
            # A duplicate delivery (another delivery holds it) or an already finished task.
            log_event(logger, "push_duplicate", task_id=task_id, code=exc.code)
            return 200, {"status": "not_claimable", "detail": exc.message}
        log_task_claimed(logger, task, worker_id=self.worker_id)
        final = await self.process(task, hold_acquired=True)
        if final.status == TaskStatus.PENDING:
            error = final.error.model_dump() if final.error else None
            if self.on_requeued is not None:
                # Enqueued again already, scheduled for the end of its backoff (available_at).
                return 200, {"status": "retry_scheduled", "error": error}
            # No dispatcher here: let Cloud Tasks deliver this one again after its backoff.
            return 503, {"status": "retry", "error": error}
        return 200, {"status": final.status.value}

    # --- one task ---------------------------------------------------------------------
    async def process(self, task: Task, *, hold_acquired: bool = False) -> Task:
        """Run a claimed task to its end and return it as stored afterwards."""
        if not hold_acquired:
            await self._held.acquire()
            self._held_count += 1
        token = bind_task(task.taskId)
        held = _Held(task.taskId, asyncio.Event(), owner=task.owner, job=asyncio.current_task())
        self.in_flight[task.taskId] = held
        keeper = asyncio.ensure_future(self._keep_lease(held))
        workdir = self.work_root / task.taskId
        timings: dict[str, float] = {}
        hold_released = False
        started = time.perf_counter()
        try:
            engine = self.engines.get(task.environment)
            if engine is None:
                raise JobFailed(
                    f"this runner has no engine for environment {task.environment!r}", code="no_engine"
                )
            workdir.mkdir(parents=True, exist_ok=True)
            phase = time.perf_counter()
            job = await self._cancellable(engine.prepare(task, workdir), held)
            timings["download_s"] = time.perf_counter() - phase
            async with self.slots[task.environment]:
                # The PROCESSING write goes alongside the engine, not in front of it (a thread
                # hop and a commit would idle the slot between jobs), and only once the engine
                # has run PROCESSING_WRITE_DELAY_S: a shorter job goes FETCHED -> COMPLETED
                # with one store write fewer.
                marking = asyncio.ensure_future(self._mark_processing(task.taskId, held, dict(timings)))
                marking.add_done_callback(functools.partial(_cancel_if_refused, held.cancel))
                held.in_engine = True
                phase = time.perf_counter()
                try:
                    result = await self._run_engine(engine, job, held)
                except BaseException:
                    await _settle(marking, held, raise_refusal=False)  # the engine's error wins
                    raise
                finally:
                    held.in_engine = False
                timings["engine_s"] = time.perf_counter() - phase
                # Conflict when the task was cancelled or taken over meanwhile.
                await _settle(marking, held, raise_refusal=True)
            # The slot is free; let the next task be claimed while this one uploads.
            self._release_hold()
            hold_released = True
            phase = time.perf_counter()
            output_data = await self._upload_outputs(task, result, held)
            timings["upload_s"] = time.perf_counter() - phase
            timings["runner_total_s"] = time.perf_counter() - started
            held.finishing = True
            final = await self._complete(task.taskId, output_data, _rounded(timings))
            self.completed += 1
            self._log_finished(final)
        except JobCancelled:
            if held.shutting_down:
                final = await self._release_once(held)
            else:
                final = await asyncio.to_thread(self.store.get_or_raise, task.taskId)
                log_event(logger, "task_stopped", status=final.status.value, reason="cancelled or lease lost")
        except ComfySwapError as exc:
            final = await self._record_failure(task, exc, timings)
        except Exception as exc:
            logger.exception("engine crashed")
            wrapped = TransientError(
                f"runner error: {type(exc).__name__}: {exc}", code="runner_internal_error"
            )
            final = await self._record_failure(task, wrapped, timings)
        except asyncio.CancelledError:
            # The runner is stopping under us (drain, or a push request cancelled at
            # shutdown): give the task back now and enqueue it again, rather than leave it
            # leased until the lease runs out. The only release path at shutdown.
            held.cancel.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._release_once(held))
            raise
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            self.in_flight.pop(task.taskId, None)
            if not hold_released:
                self._release_hold()
            # A video job leaves thousands of frames: removing them takes seconds, off the loop.
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True))
            unbind_task(token)
        if final.is_terminal and input_refs(task.params.input_data):
            # The task is over: its stored data: inputs (face images) go now.
            self._spawn(asyncio.to_thread(drop_task_inputs, self.input_store, task))
        if self._on_finished is not None and final.is_terminal:
            # Webhooks go out in the background: a slow receiver never holds a slot or a request.
            self._spawn(self._on_finished(final))
        return final

    @functools.cached_property
    def input_store(self) -> InputStore:
        return make_input_store(self.settings)

    async def _mark_processing(self, task_id: str, held: _Held, timings: dict[str, float]) -> None:
        await asyncio.sleep(PROCESSING_WRITE_DELAY_S)
        held.marking_processing = True
        await asyncio.to_thread(
            self.store.start_processing, task_id, worker_id=self.worker_id, timings=timings
        )

    async def _record_failure(self, task: Task, error: ComfySwapError, timings: dict[str, float]) -> Task:
        held = self.in_flight.get(task.taskId)
        if held is not None:
            held.finishing = True
        try:
            final = await self._write_failure(task, error, timings)
        except Conflict:
            # Cancelled or taken over meanwhile: whoever holds it now decides its fate.
            return await asyncio.to_thread(self.store.get_or_raise, task.taskId)
        except Exception as exc:
            # The error itself could not be stored (too deep, too large for the store):
            # record the same failure in plain words, so the task ends now, not at lease expiry.
            log_event(logger, "failure_record_failed", code=error.code, error=repr(exc)[:500], level=40)
            plain_type = TransientError if error.retryable else JobFailed
            plain = plain_type(error.message[:2000], code=error.code, retryable=error.retryable)
            try:
                final = await self._write_failure(task, plain, timings)
            except Conflict:
                return await asyncio.to_thread(self.store.get_or_raise, task.taskId)
        if final.status == TaskStatus.FAILED:
            self.failed += 1
            self._log_finished(final)
        else:
            log_event(
                logger,
                "task_retry",
                code=error.code,
                error=error.message,
                attempt=task.attempts,
                level=logging.WARNING,
            )
            await self._requeue(final)
        return final

    async def _write_failure(self, task: Task, error: ComfySwapError, timings: dict[str, float]) -> Task:
        return await asyncio.to_thread(
            self.store.fail_or_retry,
            task.taskId,
            worker_id=self.worker_id,
            error=error,
            timings=_rounded(timings),
            retry_delay_s=retry_delay_s(task.attempts),
        )

    async def _requeue(self, task: Task) -> None:
        if self.on_requeued is not None and task.status == TaskStatus.PENDING:
            await asyncio.to_thread(self.on_requeued, task)

    async def _release_once(self, held: _Held) -> Task:
        """Give the task back at shutdown (PENDING, attempt not counted) and enqueue it again:
        the one release path, whichever way the task was stopped."""
        if held.releasing:
            return await asyncio.to_thread(self.store.get_or_raise, held.task_id)
        held.releasing = held.finishing = True
        try:
            released = await asyncio.to_thread(
                self.store.release, held.task_id, worker_id=self.worker_id, reason="shutdown"
            )
        except ComfySwapError:  # cancelled or taken over meanwhile: not ours to give back
            return await asyncio.to_thread(self.store.get_or_raise, held.task_id)
        log_event(logger, "task_released", task_id=held.task_id, reason="shutdown")
        await self._requeue(released)
        return released

    def _log_finished(self, task: Task) -> None:
        # Timings go at the top level: log-based metrics read jsonPayload.engine_s etc.
        fields: dict[str, Any] = {
            "outcome": task.status.value,
            "code": task.error.code if task.error else "ok",
            "engine": task.environment,
            "attempt": task.attempts,
            **task.timings,
        }
        log_event(logger, "task_finished", **fields)

    async def _cancellable(self, work: Awaitable[PreparedJob], held: _Held) -> PreparedJob:
        job_future = asyncio.ensure_future(work)
        cancel_wait = asyncio.ensure_future(held.cancel.wait())
        done, _ = await asyncio.wait({job_future, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
        cancel_wait.cancel()
        if job_future in done:
            return job_future.result()
        job_future.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await job_future
        raise JobCancelled("task cancelled while its inputs downloaded")

    async def _run_engine(self, engine: Engine, job: PreparedJob, held: _Held) -> EngineResult:
        loop = asyncio.get_running_loop()

        def on_progress(progress: Progress) -> None:  # engines call it from their own threads too
            held.progress = progress
            if held.wants_progress:
                held.wants_progress = False
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(held.wake.set)

        try:
            result = await asyncio.wait_for(
                engine.run(job, on_progress, held.cancel), timeout=self.settings.task_timeout_s
            )
        except TimeoutError:
            held.cancel.set()
            raise JobFailed(
                f"the engine did not finish within TASK_TIMEOUT_S={self.settings.task_timeout_s:g}s",
                code="task_timeout",
            ) from None
        if held.cancel.is_set():
            raise JobCancelled("task cancelled while the engine ran")
        if not result.outputs:
            raise JobFailed("the engine produced no output", code="no_output")
        return result

    async def _complete(self, task_id: str, output_data: dict[str, Any], timings: dict[str, float]) -> Task:
        """COMPLETED, fenced by the lease; refused (cancelled or taken over while uploading),
        the uploaded objects are deleted: no task will point at them."""
        complete = functools.partial(
            self.store.complete, task_id, worker_id=self.worker_id, output_data=output_data, timings=timings
        )
        try:
            return await asyncio.to_thread(complete)
        except Conflict:
            await self._discard([item["key"] for item in output_data["outputs"]])
            raise

    async def _discard(self, keys: list[str]) -> None:
        """Remove result objects no task will point to (best effort; the orphan sweep is the
        backstop for what cannot be removed now)."""
        if self.discard_result is None:
            return
        for key in keys:
            try:
                await asyncio.to_thread(self.discard_result, key)
            except Exception as exc:
                log_event(logger, "result_discard_failed", key=key, error=repr(exc), level=30)
                continue
            log_event(logger, "result_discarded", key=key)

    async def _upload_outputs(self, task: Task, result: EngineResult, held: _Held) -> dict[str, Any]:
        outputs: list[dict[str, Any]] = []
        for index, output in enumerate(result.outputs):
            if held.lease_lost:
                await self._discard([item["key"] for item in outputs])
                raise JobCancelled("lease lost before upload")
            key = result_key(task.taskId, index, output.content_type, suffix=output.path.suffix or None)
            stored = await asyncio.to_thread(self.upload, output.path, key, output.content_type)
            if held.lease_lost:
                # Cancelled while the upload hung: the object must not outlive the task's claim.
                await self._discard([*(item["key"] for item in outputs), stored.key])
                raise JobCancelled("lease lost during upload")
            outputs.append(
                {
                    # The engine's description first: the storage fields below (its `key`
                    # above all) are what the client downloads, never overwritten by it.
                    **output.extra,
                    "url": stored.url,
                    "key": stored.key,
                    "provider": stored.provider,
                    "content_type": stored.content_type,
                    "size": stored.size,
                    "kind": output.kind,
                    "node_id": output.node_id,
                    "width": output.width,
                    "height": output.height,
                    "duration": output.duration,
                    **({"storage": stored.extra} if stored.extra else {}),
                }
            )
        first = outputs[0]
        return {
            "url": first["url"],
            "urls": [item["url"] for item in outputs],
            "provider": first["provider"],
            "content_type": first["content_type"],
            "width": first["width"],
            "height": first["height"],
            "duration": first["duration"],
            "outputs": outputs,
            **({"metadata": result.metadata} if result.metadata else {}),
        }

    async def _keep_lease(self, held: _Held) -> None:
        """Renew the lease, write progress (throttled), and stop the engine the moment the
        store publishes a change that took the task away (a cancel, the reaper): the
        keeper sleeps until such a change, new progress, or the next renewal is due."""
        loop = asyncio.get_running_loop()
        lease = self.settings.lease_seconds
        heartbeat_every = max(1.0, lease / 3)
        # Progress reaches the task at most every PROGRESS_INTERVAL_S (and not before that
        # long after the claim): a short image task writes none, a long one a few per
        # minute; each write also renews the lease, so progress and heartbeat never cost two.
        progress_every = self.settings.progress_interval_s

        def on_change(change: TaskChange) -> None:
            if change.status in {s.value for s in LEASED_STATUSES} and change.lease_owner == self.worker_id:
                return  # our own FETCHED -> PROCESSING, progress or renewal
            held.taken = True
            with contextlib.suppress(RuntimeError):  # the loop closed under a late change
                loop.call_soon_threadsafe(held.wake.set)

        unsubscribe = await asyncio.to_thread(self.store.subscribe_task, held.task_id, on_change)
        next_heartbeat = loop.time() + heartbeat_every
        next_progress = loop.time() + progress_every
        try:
            while True:
                progress_due = held.progress is not None and held.progress != held.progress_written
                due = min(next_heartbeat, next_progress) if progress_due else next_heartbeat
                held.wants_progress = not progress_due
                held.wake.clear()
                if not held.taken:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(held.wake.wait(), timeout=max(0.0, due - loop.time()))
                now = loop.time()
                if held.finishing:
                    return  # the final write is under way; it needs no renewal
                try:
                    if held.taken:
                        current = await asyncio.to_thread(self.store.get_or_raise, held.task_id)
                        holder = current.lease.owner if current.lease else None
                        if current.status not in LEASED_STATUSES or holder != self.worker_id:
                            raise Conflict("lease lost", code="lease_lost")
                        held.taken = False  # an older change, delivered late
                    progress = held.progress
                    if progress is not None and progress != held.progress_written and now >= next_progress:
                        await asyncio.to_thread(
                            self.store.set_progress,
                            held.task_id,
                            worker_id=self.worker_id,
                            progress=progress,
                            lease_seconds=lease,
                        )
                        held.progress_written = progress
                        next_progress = now + progress_every
                        next_heartbeat = now + heartbeat_every
                    elif now >= next_heartbeat:
                        await asyncio.to_thread(
                            self.store.heartbeat, held.task_id, worker_id=self.worker_id, lease_seconds=lease
                        )
                        next_heartbeat = now + heartbeat_every
                except (Conflict, NotFound):
                    held.lease_lost = True
                    held.cancel.set()
                    log_event(logger, "lease_lost", task_id=held.task_id, level=logging.WARNING)
                    return
                except ComfySwapError as exc:
                    log_event(
                        logger,
                        "heartbeat_failed",
                        task_id=held.task_id,
                        error=exc.message,
                        level=logging.WARNING,
                    )
                    next_heartbeat = now + min(5.0, heartbeat_every)
                except Exception as exc:  # the store hiccuped; the next beat retries before the lease ends
                    log_event(
                        logger,
                        "heartbeat_failed",
                        task_id=held.task_id,
                        error=repr(exc),
                        level=logging.WARNING,
                    )
                    next_heartbeat = now + min(5.0, heartbeat_every)
        except asyncio.CancelledError:
            return
        finally:
            unsubscribe()

    # --- shutdown ---------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Stop claiming; give in-flight tasks ``grace_s``; release the rest.

        A task still running after the grace is stopped by cancelling its asyncio task:
        its CancelledError path releases it and enqueues it again, the one release path
        (a push request uvicorn cancelled is already on it and is not cancelled twice)."""
        self.draining = True
        log_event(logger, "draining", in_flight=len(self.in_flight), grace_s=grace_s)
        pending = {task for task in self._tasks if not task.done()}
        pending |= {
            held.job for held in self.in_flight.values() if held.job is not None and not held.job.done()
        }
        if pending:
            _, still_running = await asyncio.wait(pending, timeout=grace_s)
        else:
            still_running = set()
        # Stop what is left: the engines first (ComfyUI interrupt, FaceFusion killed, the CPU
        # swap between frames), whose JobCancelled path releases; an engine that does not
        # stop in time has its asyncio task cancelled, whose path releases instead.
        stopping = [held for held in self.in_flight.values() if held.job is not None and not held.job.done()]
        for held in stopping:
            held.shutting_down = True
            held.cancel.set()
        jobs = {held.job for held in stopping if held.job is not None}
        if jobs:
            _, stuck = await asyncio.wait(jobs, timeout=STOP_WAIT_S)
            for job in stuck:
                job.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=STOP_WAIT_S)
        if self._fetching:
            # The API claims for a fetch in flight whether or not we still listen (it may
            # even re-claim a task released above): let the fetch return so the pull loop
            # releases what it got, instead of leaving it leased to a runner that is gone.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pull_stopped.wait(), timeout=self._pull_wait_s + 20.0)
        if still_running:
            # Background work (webhooks) gets a moment, not the platform's whole kill window.
            await asyncio.wait(still_running, timeout=1.0)
        for engine in self.engines.values():
            await engine.close()
        if self.source is not None:
            await self.source.close()


async def _settle(marking: asyncio.Future[None], held: _Held, *, raise_refusal: bool) -> None:
    """A PROCESSING write still waiting for its delay is dropped; one under way is waited
    for (its refusal raised when ``raise_refusal``)."""
    if not held.marking_processing:
        marking.cancel()
    results = await asyncio.gather(marking, return_exceptions=True)
    if raise_refusal and isinstance(results[0], Exception):
        raise results[0]


def _cancel_if_refused(cancel: asyncio.Event, marking: asyncio.Future[Any]) -> None:
    """A refused PROCESSING write (cancelled, or taken over) stops the engine at once."""
    if not marking.cancelled() and marking.exception() is not None:
        cancel.set()


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 6) for key, value in timings.items()}
