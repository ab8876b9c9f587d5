"""The orphan sweep: no result object (and no input) without a live task that needs it.

Results are written before the task points at them, so a crash, a cancel during an upload
or a slow provider that finishes after the fallback won can leave an object behind. The
runner checks its lease around each upload and deletes what it knows about; this sweep is
the backstop for the rest. An object under ``results/<task_id>/`` is removed when it is
older than ``older_than_s`` and its task is gone, or finished without pointing at that
provider and key. A task still PENDING or running keeps everything (it may be uploading).
Inputs under ``inputs/<task_id>/`` go when their task is gone or finished.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from shared.inputs import InputStore, sweep_inputs
from shared.logs import get_logger, log_event
from shared.storage.chain import StorageChain
from shared.store.base import TaskStore
from shared.tasks import Task, TaskStatus, utcnow

__all__ = ["purge_task", "sweep_expired_tasks", "sweep_orphans"]

logger = get_logger(__name__)

RESULTS_PREFIX = "results/"


def _referenced(task: Task) -> set[tuple[str, str]]:
    if task.status != TaskStatus.COMPLETED or not task.output_data:
        return set()
    return {
        (str(item.get("provider")), str(item.get("key")))
        for item in task.output_data.get("outputs", [])
        if isinstance(item, dict)
    }


def sweep_orphans(
    storage: StorageChain,
    store: TaskStore,
    inputs: InputStore | None = None,
    *,
    older_than_s: float = 60.0,
    now: dt.datetime | None = None,
) -> int:
    """Delete orphaned results (and inputs) of every provider that can list; returns how many."""
    now = now or utcnow()
    tasks: dict[str, Task | None] = {}

    def task_of(task_id: str) -> Task | None:
        if task_id not in tasks:
            tasks[task_id] = store.get(task_id)
        return tasks[task_id]

    removed = 0
    for provider in storage.providers:
        by_task: dict[str, list[str]] = defaultdict(list)
        for key, modified in provider.list_keys(RESULTS_PREFIX):
            if (now - modified).total_seconds() >= older_than_s:
                by_task[key.removeprefix(RESULTS_PREFIX).split("/", 1)[0]].append(key)
        for task_id, keys in by_task.items():
            task = task_of(task_id)
            if task is not None and not task.is_terminal:
                continue
            referenced = _referenced(task) if task is not None else set()
            for key in keys:
                if (provider.name, key) not in referenced and provider.delete(key):
                    removed += 1
                    log_event(logger, "orphan_removed", task_id=task_id, provider=provider.name, key=key)
    if inputs is not None:

        def is_live(task_id: str) -> bool:
            task = task_of(task_id)
            return task is not None and not task.is_terminal

        removed += sweep_inputs(inputs, is_live, older_than_s=older_than_s, now=now)
    return removed


def purge_task(storage: StorageChain, store: TaskStore, inputs: InputStore | None, task_id: str) -> int:
    """Remove a task's results from every provider that can list, its stored inputs and
    then its document (last: a failure before leaves a task the next sweep finds again)."""
    removed = 0
    for provider in storage.providers:
        for key, _ in provider.list_keys(f"{RESULTS_PREFIX}{task_id}/"):
            removed += int(provider.delete(key))
    if inputs is not None:
        removed += inputs.delete_task(task_id)
    store.delete(task_id)
    log_event(logger, "task_purged", task_id=task_id, objects=removed)
    return removed


def sweep_expired_tasks(
    storage: StorageChain,
    store: TaskStore,
    inputs: InputStore | None = None,
    *,
    now: dt.datetime | None = None,
    limit: int = 100,
) -> int:
    """Delete finished tasks past their ``expire_at`` (TASK_RETENTION_DAYS) with their
    results and inputs; returns how many tasks. Firestore's TTL policy does the same
    deployed; this sweep is what deletes them in SQLite."""
    expired = store.expired_task_ids(now or utcnow(), limit=limit)
    for task_id in expired:
        purge_task(storage, store, inputs, task_id)
    return len(expired)
