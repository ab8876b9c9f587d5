"""How a stored task reaches a runner: pushed (Cloud Tasks) or pulled (fetch_task).

Dispatch is at least once. create_task stores the task first and dispatches second; a
dispatch that fails leaves the task PENDING, logged and saying so in its ``error``
(retryable: :func:`record_dispatch_failure`), and :func:`redispatch_stale_pending`, run by
the periodic sweep, enqueues it again; a dispatch that can never succeed (no runner pool
serves the task's environment) ends the task FAILED instead of PENDING forever. A
duplicate delivery is harmless: the runner claims (PENDING -> FETCHED) before it runs
anything, and only one claim can win.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging

from shared.errors import ComfySwapError, Conflict, NotFound
from shared.logs import get_logger, log_event, log_failure
from shared.store.base import TaskStore
from shared.tasks import Task, TaskError, TaskStatus, apply_transition, utcnow

__all__ = [
    "Dispatcher",
    "NoopDispatcher",
    "OwnPoolsDispatcher",
    "RedispatchReport",
    "record_dispatch_failure",
    "redispatch_stale_pending",
]

logger = get_logger(__name__)


class Dispatcher(abc.ABC):
    @abc.abstractmethod
    def dispatch(self, task: Task) -> None:
        """Make sure a runner will get ``task``; raise shared.errors.TransientError if not now."""

    def serves(self, task: Task) -> bool:
        """Whether this dispatcher knows a way to a runner for ``task`` at all."""
        return True


class OwnPoolsDispatcher(Dispatcher):
    """A runner's dispatcher. Each runner knows only its own pool (Terraform gives a pool's
    runners that pool alone), so a task it cannot route may well be served by another
    pool: its "no runner pool" is no verdict. Only the functions, which know every pool,
    may end such a task FAILED (at create, or at the scheduled sweep). A runner leaves
    it PENDING for that sweep instead, as it does when it cannot dispatch at all."""

    def __init__(self, inner: Dispatcher) -> None:
        self.inner = inner

    def dispatch(self, task: Task) -> None:
        if not self.inner.serves(task):
            log_event(logger, "dispatch_left_to_sweep", task_id=task.taskId, environment=task.environment)
            return
        self.inner.dispatch(task)


class NoopDispatcher(Dispatcher):
    """Pull mode: runners claim through fetch_task; the store's notification wakes them."""

    def dispatch(self, task: Task) -> None:
        return None


class RedispatchReport:
    """What one sweep did, by task id: enqueued again, or still failing (and why); and the
    tasks it ended FAILED (no dispatch can ever succeed), for their owner's follow-up."""

    def __init__(self) -> None:
        self.dispatched: list[str] = []
        self.failed: dict[str, str] = {}
        self.ended: list[Task] = []

    def as_dict(self) -> dict[str, int]:
        return {"dispatched": len(self.dispatched), "failed": len(self.failed)}


def redispatch_stale_pending(
    store: TaskStore,
    dispatcher: Dispatcher,
    older_than_s: float,
    *,
    limit: int = 100,
    now: dt.datetime | None = None,
    new_generation: bool = True,
) -> RedispatchReport:
    """Enqueue again every task that has been claimable for ``older_than_s`` and is still
    PENDING, longest-waiting first: its dispatch failed, or its delivery was lost.

    With ``new_generation`` (the periodic sweep) each one first gets a new dispatch
    generation, hence a new Cloud Tasks name: by now its old Cloud Task may have run out
    of retries, and Cloud Tasks would refuse that name for an hour (ALREADY_EXISTS) and
    the task would sit PENDING. ``redispatched_at`` keeps a task from being enqueued again
    by every sweep while it waits in a backlog (once per ``older_than_s``). Without it (a
    runner starting up) the same name is reused: Cloud Tasks de-duplicates a delivery that
    is still pending. A duplicate delivery is harmless either way (one claim wins); one
    failing task does not stop the sweep.
    """
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=older_than_s)
    report = RedispatchReport()
    for task_id in store.pending_ids_available_before(cutoff, limit=limit):
        try:
            task = _due_again(store, task_id, cutoff, now) if new_generation else store.get(task_id)
        except (Conflict, NotFound):
            continue  # claimed, cancelled or enqueued again since the query
        if task is None or task.status != TaskStatus.PENDING:
            continue
        try:
            dispatcher.dispatch(task)
        except ComfySwapError as exc:
            report.failed[task_id] = exc.code
            log_failure(logger, "redispatch_failed", exc, task_id=task_id, level=logging.ERROR)
            recorded = record_dispatch_failure(store, task_id, exc)
            if recorded is not None and recorded.is_terminal:
                report.ended.append(recorded)
            continue
        report.dispatched.append(task_id)
    if report.dispatched or report.failed:
        log_event(logger, "redispatch_sweep", dispatched=len(report.dispatched), failed=len(report.failed))
    return report


def _due_again(store: TaskStore, task_id: str, cutoff: dt.datetime, now: dt.datetime) -> Task:
    """Mark a still-PENDING task as enqueued again now, under a new dispatch generation."""

    def mutate(task: Task) -> Task:
        if task.status != TaskStatus.PENDING:
            raise Conflict("no longer pending", code="not_pending")
        if task.redispatched_at is not None and task.redispatched_at > cutoff:
            raise Conflict("enqueued again recently", code="recently_dispatched")
        return task.model_copy(
            update={"dispatch_generation": task.dispatch_generation + 1, "redispatched_at": now}
        )

    return store.update(task_id, mutate)


def record_dispatch_failure(store: TaskStore, task_id: str, error: ComfySwapError) -> Task | None:
    """Say on the task that its dispatch failed: still PENDING with the error (retryable:
    the sweep enqueues it again; a claim clears it), or FAILED when no dispatch can ever
    succeed (a non-retryable error: no runner pool serves its environment). A task that
    is no longer PENDING (a "failed" enqueue that was in fact delivered and claimed) is
    left alone. Returns the task as stored, None when it was left alone."""
    task_error = TaskError(**error.to_dict())

    def mutate(task: Task) -> Task:
        if task.status != TaskStatus.PENDING:
            raise Conflict("no longer pending", code="not_pending")
        if error.retryable:
            return task.model_copy(update={"error": task_error})
        return apply_transition(task, TaskStatus.FAILED, changes={"error": task_error})

    try:
        return store.update(task_id, mutate)
    except (Conflict, NotFound):
        return None
    except ComfySwapError as exc:  # the store failed too: the log line above still says it
        log_failure(logger, "dispatch_failure_unrecorded", exc, task_id=task_id, level=logging.ERROR)
        return None
