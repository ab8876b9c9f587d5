"""How a stored task reaches a runner: pushed (Cloud Tasks) or pulled (fetch_task).

Dispatch is at least once. create_task stores the task first and dispatches second; a
dispatch that fails leaves the task PENDING and logged, and
:func:`redispatch_stale_pending`, run by the periodic sweep, enqueues it again. A
duplicate delivery is harmless: the runner claims (PENDING -> FETCHED) before it runs
anything, and only one claim can win.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging

from shared.errors import ComfySwapError
from shared.logs import get_logger, log_event
from shared.store.base import TaskStore
from shared.tasks import Task, TaskStatus, utcnow

__all__ = ["Dispatcher", "NoopDispatcher", "RedispatchReport", "redispatch_stale_pending"]

logger = get_logger(__name__)


class Dispatcher(abc.ABC):
    @abc.abstractmethod
    def dispatch(self, task: Task) -> None:
        """Make sure a runner will get ``task``; raise shared.errors.TransientError if not now."""


class NoopDispatcher(Dispatcher):
    """Pull mode: runners claim through fetch_task; the store's notification wakes them."""

    def dispatch(self, task: Task) -> None:
        return None


class RedispatchReport:
    """What one sweep did, by task id: enqueued again, or still failing (and why)."""

    def __init__(self) -> None:
        self.dispatched: list[str] = []
        self.failed: dict[str, str] = {}

    def as_dict(self) -> dict[str, int]:
        return {"dispatched": len(self.dispatched), "failed": len(self.failed)}


def redispatch_stale_pending(
    store: TaskStore,
    dispatcher: Dispatcher,
    older_than_s: float,
    *,
    limit: int = 100,
    now: dt.datetime | None = None,
) -> RedispatchReport:
    """Enqueue again every task that has been claimable for ``older_than_s`` and is still
    PENDING, longest-waiting first: its dispatch failed, or its delivery was lost.

    Cloud Tasks de-duplicates by name, so a task whose Cloud Task is merely waiting (the
    runner answered 429 and the queue backs off) is not delivered twice; choose
    ``older_than_s`` above the queue's usual wait anyway, because the Cloud Tasks emulator
    does not de-duplicate and a duplicate costs the runner a refused claim. One failing
    task does not stop the sweep.
    """
    cutoff = (now or utcnow()) - dt.timedelta(seconds=older_than_s)
    report = RedispatchReport()
    for task_id in store.pending_ids_available_before(cutoff, limit=limit):
        task = store.get(task_id)
        if task is None or task.status != TaskStatus.PENDING:
            continue  # claimed or cancelled since the query
        try:
            dispatcher.dispatch(task)
        except ComfySwapError as exc:
            report.failed[task_id] = exc.code
            log_event(
                logger,
                "redispatch_failed",
                task_id=task_id,
                code=exc.code,
                error=exc.message,
                level=logging.ERROR,
            )
            continue
        report.dispatched.append(task_id)
    if report.dispatched or report.failed:
        log_event(logger, "redispatch_sweep", dispatched=len(report.dispatched), failed=len(report.failed))
    return report
