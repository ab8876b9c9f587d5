"""How tasks reach a runner: pulled (a loop claiming while there is capacity) or pushed
(one Cloud Tasks delivery, answered with the status that tells Cloud Tasks what to do)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from gpu_runner.sources import TaskSource
from shared.errors import ComfySwapError, Conflict, NotFound
from shared.logs import get_logger, log_event, log_failure, log_task_claimed
from shared.tasks import Task, TaskStatus

if TYPE_CHECKING:
    from gpu_runner.worker import Worker

__all__ = ["pull_until_draining", "run_pushed"]

logger = get_logger(__name__)


async def pull_until_draining(worker: Worker, source: TaskSource, wait_s: float) -> None:
    """Claim tasks while there is capacity; stops when the worker drains."""
    failures = 0
    while not worker.draining:
        await worker.take_hold()
        if worker.draining:
            worker.release_hold()
            break
        # An engine that cannot work (its models are missing) claims nothing meanwhile.
        engines = worker.engines
        environments = [name for name in sorted(engines) if engines[name].accepting_work]
        if not environments:
            worker.release_hold()
            await asyncio.sleep(min(wait_s, 5.0))
            # health() re-checks (FaceFusion's model files, say) so work resumes once fixed.
            await asyncio.gather(*(engine.health() for engine in engines.values()))
            continue
        try:
            task = await _fetch(worker, source, environments, wait_s)
            failures = 0
        except Exception as exc:  # any failure: the loop must go on
            # Not only ComfySwapError: a store error (the embedded SQLite store raises
            # sqlite3 errors as they are) or an answer that does not parse would end the
            # loop, and the runner, still heartbeating, would never claim again.
            worker.release_hold()
            if worker.draining:
                break
            failures += 1
            delay = min(30.0, 0.5 * 2**failures)
            error = (
                exc
                if isinstance(exc, ComfySwapError)
                else ComfySwapError(f"{type(exc).__name__}: {exc}", code="unexpected")
            )
            log_failure(logger, "fetch_failed", error, retry_in_s=delay)
            await asyncio.sleep(delay)
            continue
        if task is None:
            worker.release_hold()
            continue
        if worker.draining:
            await _give_back(worker, task)
            break
        worker.spawn(worker.process(task, hold_acquired=True))


async def _fetch(worker: Worker, source: TaskSource, environments: list[str], wait_s: float) -> Task | None:
    """The next task, or None; a long poll that drain cancels (no task then)."""
    fetch = asyncio.ensure_future(
        source.next_task(worker_id=worker.worker_id, environments=environments, wait_s=wait_s)
    )
    worker.fetch = fetch
    try:
        return await fetch
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if fetch.cancelled() and worker.draining and not (current and current.cancelling()):
            return None  # drain stopped the long poll, not someone stopping the pull loop
        raise
    finally:
        worker.fetch = None


async def run_pushed(worker: Worker, task_id: str) -> tuple[int, dict[str, Any]]:
    """Handle one Cloud Tasks delivery; returns (HTTP status, body).

    2xx tells Cloud Tasks to stop; 429/503 make it retry later with backoff."""
    if worker.draining:
        return 503, {"status": "draining", "retry_after_s": 10}
    if worker.busy:
        return 429, {"status": "busy", "retry_after_s": 5}
    await worker.take_hold()
    try:
        task = await asyncio.to_thread(
            worker.store.claim,
            task_id,
            worker_id=worker.worker_id,
            lease_seconds=worker.settings.lease_seconds,
        )
    except NotFound:
        worker.release_hold()
        log_event(logger, "push_unknown_task", task_id=task_id, level=logging.WARNING)
        return 200, {"status": "unknown_task"}
    except Conflict as exc:
        worker.release_hold()
        if exc.code == "not_available_yet":
            # In retry backoff: Cloud Tasks delivers again after Retry-After.
            retry_after_s = int(exc.details.get("retry_after_s", 1))
            return 503, {"status": "not_available_yet", "retry_after_s": retry_after_s}
        # A duplicate delivery (another delivery holds it) or an already finished task.
        log_event(logger, "push_duplicate", task_id=task_id, code=exc.code)
        return 200, {"status": "not_claimable", "detail": exc.message}
    if worker.draining:
        # Drain began while the claim was in flight: it could not see this task (it is not
        # in flight yet), so it would run to its end past the grace. Give it back instead.
        await _give_back(worker, task)
        if worker.on_requeued is not None:
            return 200, {"status": "released"}  # enqueued again already
        return 503, {"status": "draining", "retry_after_s": 10}
    log_task_claimed(logger, task, worker_id=worker.worker_id)
    final = await worker.process(task, hold_acquired=True)
    if final.status == TaskStatus.PENDING:
        error = final.error.model_dump() if final.error else None
        if worker.on_requeued is not None:
            # Enqueued again already, scheduled for the end of its backoff (available_at).
            return 200, {"status": "retry_scheduled", "error": error}
        # No dispatcher here: let Cloud Tasks deliver this one again after its backoff.
        return 503, {"status": "retry", "error": error}
    return 200, {"status": final.status.value}


async def _give_back(worker: Worker, task: Task) -> None:
    """Release a task claimed after drain began (PENDING, attempt not counted), enqueue it
    again, and free its hold."""
    try:
        released = await asyncio.to_thread(
            worker.store.release, task.taskId, worker_id=worker.worker_id, reason="draining"
        )
        log_event(logger, "task_released", task_id=task.taskId, reason="draining")
        await worker.requeue(released)
    finally:
        worker.release_hold()
