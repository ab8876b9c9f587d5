"""The line of waiters for work in one process (shared/store/notify.py WorkLine) on the
embedded store: a change wakes one waiter, and no wake may be dropped on the way (the
cases every backend shares are in tests/contract/test_waiting_for_work.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.dispatch.base import NoopDispatcher
from shared.service import MAX_FETCH_WAIT_S, TaskService
from shared.settings import Settings
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, TaskStatus
from tests.waiting_fetches import count_claims


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteTaskStore]:
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    yield store
    store.close()


def _task() -> Task:
    return Task(workflow="face_swap", environment="face_swap", owner="key-a")


def test_a_waiter_that_takes_a_task_hands_the_next_wake_to_another_not_to_itself(store):
    """A waiter that took a task wakes the next, because one change may stand for more
    tasks (a Firestore head snapshot for a burst; a fleet claimer that took another task
    than the head, so the head did not change). The taker leaves with its task: a wake
    it gave itself went with it, and a waiter between two claims (not yet blocked) then
    slept to its deadline with the rest of the burst PENDING."""
    with store.watch_work(["face_swap"]) as first, store.watch_work(["face_swap"]) as second:
        first.tried(took=False)  # both claimed and found nothing, neither blocks yet
        second.tried(took=False)
        store.create(_task())
        assert first.wait(10.0) is True  # nobody blocked: the first to join was woken
        assert second.wait(0.0) is False

        first.tried(took=True)

        assert second.wait(0.0) is True


def test_a_wake_that_came_during_a_claim_still_carries_the_chain_on(store):
    """A change that came while its waiter's claim was in flight is not used by that claim
    (it may have read the store before the change): the next claim acts on it, and when
    that one takes a task it wakes the next waiter, as any woken taker does. Before, the
    empty claim counted as the wake's use, so the taker woke nobody: with Firestore's head
    listener one change stands for a whole burst, and a claimer of a fleet takes a random
    task of it, not the head (no new head, no new change): the rest of the burst stayed
    PENDING while the other waiter slept to its deadline."""
    with store.watch_work(["face_swap"]) as first, store.watch_work(["face_swap"]) as second:
        store.create(_task())  # during both waiters' first claims (neither blocked yet)
        first.tried(took=False)  # its claim had read the store before the change
        second.tried(took=False)
        assert first.wait(10.0) is True  # the wake is still there: it claims again at once
        assert second.wait(0.0) is False

        first.tried(took=True)

        assert second.wait(0.0) is True


def test_a_subscription_that_failed_once_does_not_leave_the_process_deaf(store, tmp_path):
    """The first waiter of a line subscribes for the whole line. When that subscription
    fails (here: the change folder has the wrong mode; in production a full file table),
    that fetch fails; it must not stay behind as a phantom waiter holding the line's
    "subscribing" mark, or every later long poll of the process sleeps to its deadline
    while tasks arrive."""
    service = TaskService(Settings(data_dir=tmp_path / "data"), store, NoopDispatcher())
    folder = store._changes.directory
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o777)
    try:
        with pytest.raises(PermissionError):
            service.fetch_for_runner(worker_id="runner-1", environments=["face_swap"], wait_s=1.0)
    finally:
        folder.chmod(0o700)

    claims = count_claims(store)
    fetched: list[Task | None] = []
    waiting = threading.Thread(
        target=lambda: fetched.append(
            service.fetch_for_runner(
                worker_id="runner-2", environments=["face_swap"], wait_s=MAX_FETCH_WAIT_S
            )
        )
    )
    waiting.start()
    deadline = time.monotonic() + 30.0
    while not claims and time.monotonic() < deadline:
        time.sleep(0.01)
    assert claims == [""]  # it found nothing: it waits
    creator = SQLiteTaskStore(tmp_path / "tasks.sqlite3")  # another process's store (the API's)
    task = creator.create(_task())
    deadline = time.monotonic() + 10.0  # the waiter's own deadline is 25 s after it began
    while (store.get(task.taskId) or task).status == TaskStatus.PENDING and time.monotonic() < deadline:
        time.sleep(0.01)
    taken = (store.get(task.taskId) or task).status != TaskStatus.PENDING
    waiting.join(timeout=60)
    creator.close()

    assert taken, "the task stayed PENDING while a long poll of this process waited"
    assert [found.taskId if found else None for found in fetched] == [task.taskId]
