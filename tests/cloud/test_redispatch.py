"""The re-dispatch sweep: PENDING tasks whose delivery failed or was lost are enqueued
again, longest-waiting first, and one failure does not stop the sweep."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.dispatch import Dispatcher, redispatch_stale_pending
from shared.errors import UpstreamUnavailable
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, TaskStatus, utcnow


class RecordingDispatcher(Dispatcher):
    def __init__(self, failing: set[str] | None = None) -> None:
        self.dispatched: list[str] = []
        self.failing = failing or set()

    def dispatch(self, task: Task) -> None:
        if task.taskId in self.failing:
            raise UpstreamUnavailable("Cloud Tasks is down", code="dispatch_failed")
        self.dispatched.append(task.taskId)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteTaskStore]:
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    yield store
    store.close()


def add(store: SQLiteTaskStore, minutes_ago: float, **overrides: object) -> Task:
    at = utcnow() - dt.timedelta(minutes=minutes_ago)
    task = Task(workflow="face_swap", environment="face_swap", created_at=at, available_at=at, **overrides)
    return store.create(task)


def test_only_stale_pending_tasks_are_dispatched_again_oldest_first(store: SQLiteTaskStore) -> None:
    fresh = add(store, 1)
    stale = add(store, 10)
    staler = add(store, 30)
    cancelled = add(store, 40)
    store.cancel(cancelled.taskId)
    dispatcher = RecordingDispatcher()

    report = redispatch_stale_pending(store, dispatcher, older_than_s=300)

    assert dispatcher.dispatched == [staler.taskId, stale.taskId]
    assert fresh.taskId not in dispatcher.dispatched
    assert report.as_dict() == {"dispatched": 2, "failed": 0}
    assert all(store.get_or_raise(t).status == TaskStatus.PENDING for t in dispatcher.dispatched)


def test_a_failing_dispatch_is_reported_and_the_sweep_goes_on(store: SQLiteTaskStore) -> None:
    first = add(store, 20)
    second = add(store, 10)
    dispatcher = RecordingDispatcher(failing={first.taskId})

    report = redispatch_stale_pending(store, dispatcher, older_than_s=60)

    assert report.failed == {first.taskId: "dispatch_failed"}
    assert report.dispatched == [second.taskId]


def test_the_sweep_is_bounded_by_its_limit(store: SQLiteTaskStore) -> None:
    for minutes in range(5, 10):
        add(store, minutes)
    dispatcher = RecordingDispatcher()

    report = redispatch_stale_pending(store, dispatcher, older_than_s=60, limit=2)

    assert len(report.dispatched) == 2


def test_the_sweep_uses_a_new_cloud_task_name_once_per_period(store: SQLiteTaskStore) -> None:
    """Issue 19 #2: the sweep re-sent the same name; Cloud Tasks answers ALREADY_EXISTS for
    an hour after that name ran, so the task sat PENDING. A backlogged task is not sent
    again by every sweep either."""
    from shared.dispatch.cloud_tasks import cloud_task_id

    stale = add(store, 10)
    names: list[str] = []

    class Naming(RecordingDispatcher):
        def dispatch(self, task: Task) -> None:
            names.append(cloud_task_id(task))

    redispatch_stale_pending(store, Naming(), older_than_s=300)
    redispatch_stale_pending(store, Naming(), older_than_s=300)
    later = utcnow() + dt.timedelta(seconds=301)
    redispatch_stale_pending(store, Naming(), older_than_s=300, now=later)

    assert len(names) == 2 and len(set(names)) == 2
    assert cloud_task_id(stale) not in names
    assert store.get_or_raise(stale.taskId).dispatch_generation == 2
