"""Waiting for work in one process (the fetch_task long polls of many runners in one API
instance), on every backend: a change wakes ONE waiter (shared/store/notify.py WorkLine),
so whatever that waiter learns must not leave with it while a claimable task stays
PENDING and the other waiters sleep to their deadlines.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shared.dispatch.base import NoopDispatcher
from shared.service import MAX_FETCH_WAIT_S, TaskService
from shared.settings import Settings
from shared.store.base import TaskStore
from shared.tasks import Task, TaskStatus, utcnow
from tests.waiting_fetches import count_claims


def _until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def _taken_by(store: TaskStore, task: Task, by: dt.datetime) -> bool:
    """Whether ``task`` leaves PENDING before ``by``."""
    return _until(
        lambda: (store.get(task.taskId) or task).status != TaskStatus.PENDING,
        max(0.0, (by - utcnow()).total_seconds()),
    )


def test_a_retry_backoff_learned_by_a_runner_that_hangs_up_reaches_the_next_waiter(
    store: TaskStore, tmp_path: Path
) -> None:
    """Two runners' long polls wait. A task that becomes claimable in a few seconds (a
    retry's backoff) is published once: it wakes the longest waiting, which claims
    nothing yet and waits for the backoff's end. That runner then hangs up (it is
    stopping: scale-in, SIGTERM). The other waiter computed its wait before the task
    existed and knows of no wake time: unless the knowledge is handed on, it sleeps to
    its own deadline (25 s) while the task is claimable."""
    service = TaskService(Settings(data_dir=tmp_path / "data"), store, NoopDispatcher())
    claims = count_claims(store)
    results: dict[str, Task | None] = {}
    first_gone = threading.Event()

    def fetch(worker_id: str, caller_gone: Callable[[], bool]) -> None:
        results[worker_id] = service.fetch_for_runner(
            worker_id=worker_id,
            environments=["face_swap"],
            wait_s=MAX_FETCH_WAIT_S,
            caller_gone=caller_gone,
        )

    first = threading.Thread(target=fetch, args=("runner-1", first_gone.is_set))
    first.start()
    assert _until(lambda: len(claims) == 1, 30), claims  # runner-1 found nothing: it waits
    second = threading.Thread(target=fetch, args=("runner-2", lambda: False))
    second.start()
    assert _until(lambda: len(claims) == 2, 30), claims  # runner-2 too, behind runner-1

    backoff = dt.timedelta(seconds=3)
    task = store.create(
        Task(workflow="face_swap", environment="face_swap", owner="key-a", available_at=utcnow() + backoff)
    )
    # The change woke runner-1 (the longest waiting); its claim finds nothing yet.
    assert _until(lambda: len(claims) == 3, 30), claims
    assert claims == ["", "", ""]
    first_gone.set()
    first.join(timeout=60)
    assert results["runner-1"] is None

    # runner-2 must take the task once it is claimable, long before its own deadline
    # (about 22 s after the backoff ends). 10 s is room for a busy machine.
    taken = _taken_by(store, task, task.available_at + dt.timedelta(seconds=10))
    second.join(timeout=60)

    assert taken, f"PENDING {(utcnow() - task.available_at).total_seconds():.1f} s after its backoff ended"
    assert results["runner-2"] is not None and results["runner-2"].taskId == task.taskId


def _listening(store: TaskStore) -> bool:
    """Firestore: the work listeners have delivered their first snapshots. A task written
    before that is in a first snapshot, not a change: the test would pass by timing."""
    feeds = getattr(store, "_work_feeds", None)
    if feeds is None:
        return True  # SQLite: every write publishes, nothing to wait for
    return bool(feeds) and all(feed.listening() for feed in list(feeds.values()))


def _a_fetch_waiting_behind_a_head_in_backoff(
    store: TaskStore, tmp_path: Path
) -> tuple[threading.Thread, list[Task | None]]:
    """A high-priority task in a retry backoff as long as a fetch's wait heads the queue,
    and one fetch waits (its claim found nothing claimable; the listeners are up)."""
    service = TaskService(Settings(data_dir=tmp_path / "data"), store, NoopDispatcher())
    claims = count_claims(store)
    backoff = dt.timedelta(seconds=MAX_FETCH_WAIT_S)
    store.create(
        Task(
            workflow="face_swap",
            environment="face_swap",
            owner="key-a",
            priority=9,
            available_at=utcnow() + backoff,
        )
    )
    results: list[Task | None] = []

    def fetch() -> None:
        wait_s = MAX_FETCH_WAIT_S
        results.append(
            service.fetch_for_runner(worker_id="runner-1", environments=["face_swap"], wait_s=wait_s)
        )

    waiting = threading.Thread(target=fetch)
    waiting.start()
    assert _until(lambda: len(claims) >= 1, 30), claims  # it found nothing claimable: it waits
    assert _until(lambda: _listening(store), 30)
    return waiting, results


def test_a_task_that_arrives_behind_a_higher_priority_one_in_backoff_is_taken_at_once(
    store: TaskStore, tmp_path: Path
) -> None:
    """The queue's head is a high-priority task in retry backoff; a lower-priority task
    that is claimable now arrives. A waiter must take it now, not when the head's backoff
    ends (a listener on the head alone sees no change: the head stays the head)."""
    waiting, results = _a_fetch_waiting_behind_a_head_in_backoff(store, tmp_path)

    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a", priority=1))
    taken = _until(lambda: (store.get(task.taskId) or task).status != TaskStatus.PENDING, 10.0)
    waiting.join(timeout=60)

    assert taken, "a claimable task stayed PENDING while a fetch waited for the head's backoff"
    assert [found.taskId if found else None for found in results] == [task.taskId]


def test_a_backoff_behind_a_higher_priority_one_in_a_longer_backoff_ends_a_wait_when_it_ends(
    store: TaskStore, tmp_path: Path
) -> None:
    """The head is a high-priority task in a long retry backoff; a lower-priority task is
    put behind it with a short one. No write marks the short backoff's end: a waiter must
    wake for it then (next_wake_at), not at the head's backoff end or its own deadline."""
    waiting, results = _a_fetch_waiting_behind_a_head_in_backoff(store, tmp_path)

    available_at = utcnow() + dt.timedelta(seconds=2)
    task = store.create(
        Task(
            workflow="face_swap",
            environment="face_swap",
            owner="key-a",
            priority=1,
            available_at=available_at,
        )
    )
    # 10 s after its backoff ends is room for a busy machine, and well before the head's.
    taken = _taken_by(store, task, task.available_at + dt.timedelta(seconds=10))
    waiting.join(timeout=60)

    assert taken, f"PENDING {(utcnow() - task.available_at).total_seconds():.1f} s after its backoff ended"
    assert [found.taskId if found else None for found in results] == [task.taskId]
