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

This module is the pipeline of one task and the runner's capacity; the seams live beside it:
``sources`` (where pulled tasks come from), ``intake`` (the pull loop and push deliveries),
``lease`` (heartbeat, progress, lease loss), ``results`` (uploads and the fenced COMPLETED
write) and ``drain`` (shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gpu_runner import intake
from gpu_runner.drain import drain
from gpu_runner.engines.base import Engine, EngineResult, PreparedJob
from gpu_runner.lease import HeldTask, keep_lease, progress_reporter
from gpu_runner.results import Discarder, Uploader, finish_job, rounded
from gpu_runner.sources import HttpTaskSource, StoreTaskSource, TaskSource
from gpu_runner.wake import CancelSignal
from shared.errors import (
    ComfySwapError,
    Conflict,
    JobCancelled,
    JobFailed,
    RateLimited,
    RunnerBusy,
    TransientError,
)
from shared.inputs import InputStore, drop_task_inputs, input_refs, make_input_store
from shared.logs import bind_task, get_logger, log_event, log_failure, unbind_task
from shared.settings import Settings
from shared.store.base import TaskStore
from shared.tasks import Task, TaskStatus, utcnow

__all__ = ["HttpTaskSource", "StoreTaskSource", "TaskSource", "Uploader", "Worker"]

logger = get_logger(__name__)


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
        self.in_flight: dict[str, HeldTask] = {}
        # Tasks this worker started (pulled jobs, input clean-up, webhooks): drain waits for them.
        self.spawned: set[asyncio.Task[Any]] = set()
        self.draining = False
        # The pull loop's long poll in flight, which drain cancels.
        self.fetch: asyncio.Future[Task | None] | None = None
        self.pull_stopped = asyncio.Event()
        self._on_finished = on_finished
        # Push mode: enqueue a task this runner put back to PENDING (released, or retried
        # after a transient error) at once, under its new dispatch generation. Pull mode
        # needs nothing: a waiting fetch wakes on the store's notification.
        self.on_requeued: Callable[[Task], None] | None = None
        # Removes a result object from every store (the storage chain's delete).
        self.discard_result: Discarder | None = None
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
        await self.take_hold()
        try:
            yield
        finally:
            self.release_hold()

    # --- pull mode --------------------------------------------------------------------
    async def run_pull_loop(self, *, wait_s: float = 10.0) -> None:
        """Claim tasks while there is capacity; stops when ``draining`` is set."""
        assert self.source is not None, "pull mode needs a task source"
        # A fetch outliving this runner (killed -9) can still claim a task; keeping the wait
        # under half a lease bounds what such an orphaned claim costs.
        wait_s = min(wait_s, self.settings.lease_seconds / 2)
        try:
            await intake.pull_until_draining(self, self.source, wait_s)
        finally:
            self.pull_stopped.set()

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self.spawned.add(task)
        task.add_done_callback(self.spawned.discard)
        return task

    async def take_hold(self) -> None:
        """One of the runner's ``capacity`` places: a claimed or direct job holds one."""
        await self._held.acquire()
        self._held_count += 1

    def release_hold(self) -> None:
        self._held_count -= 1
        self._held.release()

    # --- push mode --------------------------------------------------------------------
    async def run_pushed(self, task_id: str) -> tuple[int, dict[str, Any]]:
        """Handle one Cloud Tasks delivery; returns (HTTP status, body) (see intake)."""
        return await intake.run_pushed(self, task_id)

    # --- one task ---------------------------------------------------------------------
    async def process(self, task: Task, *, hold_acquired: bool = False) -> Task:
        """Run a claimed task to its end and return it as stored afterwards."""
        if not hold_acquired:
            await self.take_hold()
        token = bind_task(task.taskId)
        held = HeldTask(task.taskId, CancelSignal(), owner=task.owner, job=asyncio.current_task())
        self.in_flight[task.taskId] = held
        keeper = asyncio.ensure_future(
            keep_lease(
                held,
                self.store,
                worker_id=self.worker_id,
                lease_seconds=self.settings.lease_seconds,
                progress_interval_s=self.settings.progress_interval_s,
            )
        )
        workdir = self.work_root / task.taskId
        timings: dict[str, float] = {}
        hold_released = False
        workdir_removed = False
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
                marking = _ProcessingMark(self, task.taskId, held, dict(timings))
                held.in_engine = True
                engine_started_at = utcnow()
                phase = time.perf_counter()
                try:
                    result = await self._run_engine(engine, job, held)
                except BaseException:
                    await marking.settle(raise_refusal=False)  # the engine's error wins
                    raise
                finally:
                    held.in_engine = False
                timings["engine_s"] = time.perf_counter() - phase
                # Conflict when the task was cancelled or taken over meanwhile.
                await marking.settle(raise_refusal=True)
            # The slot is free; let the next task be claimed while this one uploads.
            self.release_hold()
            hold_released = True
            # Uploads, COMPLETED and the work folder's removal: one thread hop (results.py).
            finishing = asyncio.to_thread(
                finish_job,
                self.store,
                task,
                result,
                held,
                upload=self.upload,
                discard=self.discard_result,
                worker_id=self.worker_id,
                timings=timings,
                started=started,
                engine_started_at=engine_started_at,
                workdir=workdir,
            )
            workdir_removed = True  # by the hop, once awaited (next line), whatever happens
            final = await finishing
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
                self.release_hold()
            if not workdir_removed:
                # A video job leaves thousands of frames: removing them takes seconds, off the loop.
                await asyncio.shield(asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True))
            unbind_task(token)
        if final.is_terminal and input_refs(task.params.input_data):
            # The task is over: its stored data: inputs (face images) go now.
            self.spawn(asyncio.to_thread(drop_task_inputs, self.input_store, task))
        if self._on_finished is not None and final.is_terminal and final.webhook_url:
            # Webhooks go out in the background: a slow receiver never holds a slot or a request.
            self.spawn(self._on_finished(final))
        return final

    @functools.cached_property
    def input_store(self) -> InputStore:
        return make_input_store(self.settings)

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
            log_failure(logger, "task_retry", error, attempt=task.attempts)
            await self.requeue(final)
        return final

    async def _write_failure(self, task: Task, error: ComfySwapError, timings: dict[str, float]) -> Task:
        return await asyncio.to_thread(
            self.store.fail_or_retry,
            task.taskId,
            worker_id=self.worker_id,
            error=error,
            timings=rounded(timings),
            retry_delay_s=retry_delay_s(task.attempts),
        )

    async def requeue(self, task: Task) -> None:
        if self.on_requeued is not None and task.status == TaskStatus.PENDING:
            await asyncio.to_thread(self.on_requeued, task)

    async def _release_once(self, held: HeldTask) -> Task:
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
        await self.requeue(released)
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

    async def _cancellable(self, work: Awaitable[PreparedJob], held: HeldTask) -> PreparedJob:
        """``work`` (the downloads) in this task, stopped at once when the task is cancelled
        meanwhile: the cancel signal cancels this task, and that cancellation (only that
        one: not a shutdown's) becomes JobCancelled."""
        if held.cancel.is_set():
            if inspect.iscoroutine(work):
                work.close()  # never started
            raise JobCancelled("task cancelled before its inputs downloaded")
        current = asyncio.current_task()
        assert current is not None, "process() runs in a task"
        # set() runs while this task waits inside ``work``: the cancellation lands there.
        stop_hook = held.cancel.on_set(current.cancel)
        try:
            return await work
        except asyncio.CancelledError:
            if held.cancel.is_set() and current.uncancel() == 0:
                raise JobCancelled("task cancelled while its inputs downloaded") from None
            raise  # this job itself is being cancelled (shutdown)
        finally:
            stop_hook()

    async def _run_engine(self, engine: Engine, job: PreparedJob, held: HeldTask) -> EngineResult:
        try:
            # In this task, not one of its own (as asyncio.wait_for would run it).
            async with asyncio.timeout(self.settings.task_timeout_s):
                result = await engine.run(job, progress_reporter(held), held.cancel)
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

    # --- shutdown ---------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Stop claiming; give in-flight tasks ``grace_s``; release the rest (see drain)."""
        await drain(self, grace_s)


class _ProcessingMark:
    """The PROCESSING write of a job on the engine, made once it has run
    PROCESSING_WRITE_DELAY_S: until then a timer, not a task (most ComfyUI jobs end first)."""

    def __init__(self, worker: Worker, task_id: str, held: HeldTask, timings: dict[str, float]) -> None:
        self._worker = worker
        self._task_id = task_id
        self._held = held
        self._timings = timings
        self._write: asyncio.Future[Any] | None = None
        self._timer = asyncio.get_running_loop().call_later(PROCESSING_WRITE_DELAY_S, self._start)

    def _start(self) -> None:
        self._held.marking_processing = True
        write = functools.partial(
            self._worker.store.start_processing,
            self._task_id,
            worker_id=self._worker.worker_id,
            timings=self._timings,
        )
        self._write = asyncio.ensure_future(asyncio.to_thread(write))
        self._write.add_done_callback(self._cancel_if_refused)

    def _cancel_if_refused(self, write: asyncio.Future[Any]) -> None:
        """A refused PROCESSING write (cancelled, or taken over) stops the engine at once."""
        if not write.cancelled() and write.exception() is not None:
            self._held.cancel.set()

    async def settle(self, *, raise_refusal: bool) -> None:
        """A write still waiting for its delay is dropped; one under way is waited for (its
        refusal raised when ``raise_refusal``)."""
        self._timer.cancel()
        if self._write is None:
            return
        results = await asyncio.gather(self._write, return_exceptions=True)
        if raise_refusal and isinstance(results[0], Exception):
            raise results[0]
