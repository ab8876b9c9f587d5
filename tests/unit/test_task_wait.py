"""GET /api/tasks/{id}?wait=: the long poll wakes when the task ends, not on each change
on the way (a runner's claim or progress would only send it back to waiting: a thread
woken per job for nothing in the API, figure 8), and still answers the latest state when
its wait runs out."""

from __future__ import annotations

import threading
from pathlib import Path

from shared.auth import Principal
from shared.dispatch.base import NoopDispatcher
from shared.service import TaskService
from shared.settings import Settings
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, TaskStatus

# Far longer than a commit takes to wake a waiter on a busy machine.
LONG_S = 30.0


def _store_and_task(tmp_path: Path) -> tuple[SQLiteTaskStore, Task]:
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    return store, store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))


def test_a_task_watch_for_its_end_is_not_woken_by_a_claim_but_keeps_it(tmp_path: Path) -> None:
    store, task = _store_and_task(tmp_path)
    try:
        with store.watch_task(task.taskId, wake_on={"COMPLETED", "FAILED", "CANCELLED"}) as watch:
            store.claim(task.taskId, worker_id="runner-1", lease_seconds=60)
            woken_by_claim = watch.wait(0.2)
            claimed_seen = watch.last.status if watch.last else None
            store.cancel(task.taskId)
            woken_by_end = watch.wait(LONG_S)
    finally:
        store.close()

    assert woken_by_claim is False
    assert claimed_seen == TaskStatus.FETCHED.value
    assert woken_by_end is True and watch.last is not None and watch.last.status == "CANCELLED"


def test_a_long_poll_answers_the_end_and_on_timeout_the_latest_state(tmp_path: Path) -> None:
    store, task = _store_and_task(tmp_path)
    service = TaskService(Settings(data_dir=tmp_path / "data"), store, NoopDispatcher())
    owner = Principal(owner="key-a", roles=frozenset({"client"}))
    try:
        claim = threading.Timer(0.05, store.claim, (task.taskId,), {"worker_id": "r", "lease_seconds": 60})
        claim.start()
        timed_out = service.get_task(task.taskId, principal=owner, wait_s=0.5)
        claim.join()
        cancel = threading.Timer(0.05, store.cancel, (task.taskId,))
        cancel.start()
        ended = service.get_task(task.taskId, principal=owner, wait_s=20.0)
        cancel.join()
    finally:
        store.close()

    assert timed_out.status == TaskStatus.FETCHED  # not the PENDING it read before waiting
    assert ended.status == TaskStatus.CANCELLED
