"""Fencing: every write of a runner that lost its lease is refused, whatever the task's state.

A transition table: the old holder (runner-old) claimed the task, then lost it; the task
moved on to one of the states below (reaped back to PENDING, in retry backoff, claimed by
runner-new, or finished). From each state, every write a runner can make is tried with
runner-old's id; each must raise Conflict and leave the stored task exactly as it was.
Run against every backend (conftest.py: SQLite and the Firestore emulator).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from shared.errors import Conflict, JobFailed, TransientError
from shared.store.base import TaskStore
from shared.tasks import Progress, Task, TaskStatus, utcnow

OLD = "runner-old"
NEW = "runner-new"
LEASE_S = 60.0


# The reaper runs "after the lease", at this offset; claims after it use the same clock.
AFTER_LEASE = dt.timedelta(seconds=LEASE_S + 1)


def _claimed_by(store: TaskStore, worker_id: str) -> Task:
    task = store.claim_next(
        worker_id=worker_id, environments=["face_swap"], lease_seconds=LEASE_S, now=utcnow() + AFTER_LEASE
    )
    assert task is not None
    return task


def _lost_lease(store: TaskStore) -> str:
    """A task runner-old claimed, whose lease ran out and was reaped: PENDING again."""
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a", max_attempts=5))
    store.claim_next(worker_id=OLD, environments=["face_swap"], lease_seconds=LEASE_S)
    reaped = store.reap_expired_leases(now=utcnow() + AFTER_LEASE)
    assert [item.taskId for item in reaped] == [task.taskId]
    return task.taskId


def state_reaped_pending(store: TaskStore) -> str:
    return _lost_lease(store)


def state_pending_in_backoff(store: TaskStore) -> str:
    task_id = _lost_lease(store)
    _claimed_by(store, NEW)
    store.fail_or_retry(task_id, worker_id=NEW, error=TransientError("blip", code="blip"), retry_delay_s=3600)
    return task_id


def state_fetched_by_new(store: TaskStore) -> str:
    task_id = _lost_lease(store)
    _claimed_by(store, NEW)
    return task_id


def state_processing_by_new(store: TaskStore) -> str:
    task_id = state_fetched_by_new(store)
    store.start_processing(task_id, worker_id=NEW)
    return task_id


def state_completed(store: TaskStore) -> str:
    task_id = state_fetched_by_new(store)
    store.complete(task_id, worker_id=NEW, output_data={"url": "https://example.com/r.png"})
    return task_id


def state_failed(store: TaskStore) -> str:
    task_id = state_fetched_by_new(store)
    store.fail_or_retry(task_id, worker_id=NEW, error=JobFailed("bad input", code="bad"))
    return task_id


def state_cancelled(store: TaskStore) -> str:
    task_id = state_fetched_by_new(store)
    store.cancel(task_id)
    return task_id


STATES: dict[str, Callable[[TaskStore], str]] = {
    "reaped_pending": state_reaped_pending,
    "pending_in_backoff": state_pending_in_backoff,
    "fetched_by_new": state_fetched_by_new,
    "processing_by_new": state_processing_by_new,
    "completed": state_completed,
    "failed": state_failed,
    "cancelled": state_cancelled,
}

Write = Callable[[TaskStore, str], Any]


def _transition_to(status: TaskStatus) -> Write:
    return lambda store, task_id: store.transition(task_id, status, worker_id=OLD)


WRITES: dict[str, Write] = {
    "heartbeat": lambda store, task_id: store.heartbeat(task_id, worker_id=OLD, lease_seconds=LEASE_S),
    "set_progress": lambda store, task_id: store.set_progress(
        task_id, worker_id=OLD, progress=Progress(value=1, max=2, stage="frames")
    ),
    "start_processing": lambda store, task_id: store.start_processing(task_id, worker_id=OLD),
    "complete": lambda store, task_id: store.complete(
        task_id, worker_id=OLD, output_data={"url": "https://example.com/stale.png"}
    ),
    "fail_permanent": lambda store, task_id: store.fail_or_retry(
        task_id, worker_id=OLD, error=JobFailed("stale failure", code="stale")
    ),
    "fail_retryable": lambda store, task_id: store.fail_or_retry(
        task_id, worker_id=OLD, error=TransientError("stale blip", code="stale")
    ),
    "release": lambda store, task_id: store.release(task_id, worker_id=OLD, reason="shutdown"),
    **{f"transition_to_{status.value.lower()}": _transition_to(status) for status in TaskStatus},
}


@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("state", sorted(STATES))
def test_an_old_holder_cannot_write_in_any_state(store: TaskStore, state: str, write: str) -> None:
    task_id = STATES[state](store)
    before = store.get_or_raise(task_id).to_document()

    with pytest.raises(Conflict):
        WRITES[write](store, task_id)

    assert store.get_or_raise(task_id).to_document() == before


def test_the_reported_finding_an_old_holder_fails_a_reaped_task(store: TaskStore) -> None:
    """Issue 19 finding 3: claim with a 1 s lease, reap, then fail_or_retry from the old holder."""
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))
    store.claim_next(worker_id=OLD, environments=["face_swap"], lease_seconds=1)
    store.reap_expired_leases(now=utcnow() + dt.timedelta(seconds=2))

    with pytest.raises(Conflict) as raised:
        store.fail_or_retry(task.taskId, worker_id=OLD, error=JobFailed("late", code="late"))

    assert raised.value.code == "lease_lost"
    assert store.get_or_raise(task.taskId).status == TaskStatus.PENDING


def test_the_holder_itself_still_writes(store: TaskStore) -> None:
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))
    _claimed_by(store, OLD)
    store.set_progress(task.taskId, worker_id=OLD, progress=Progress(value=1, max=2))
    store.start_processing(task.taskId, worker_id=OLD)
    done = store.complete(task.taskId, worker_id=OLD, output_data={"url": "https://example.com/r.png"})
    assert done.status == TaskStatus.COMPLETED


def test_a_release_resets_progress_and_starts_a_new_dispatch_generation(store: TaskStore) -> None:
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))
    _claimed_by(store, OLD)
    store.set_progress(task.taskId, worker_id=OLD, progress=Progress(value=40, max=120, stage="frames"))

    released = store.release(task.taskId, worker_id=OLD, reason="shutdown")

    assert released.progress is None
    assert released.attempts == 0
    assert released.dispatch_generation == task.dispatch_generation + 1
    assert store.get_or_raise(task.taskId).progress is None


def test_every_return_to_pending_is_a_new_dispatch_generation(store: TaskStore) -> None:
    """Released (attempts decremented), reaped, retried: the generation never repeats."""
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a", max_attempts=9))
    generations = [task.dispatch_generation]
    _claimed_by(store, OLD)
    generations.append(store.release(task.taskId, worker_id=OLD, reason="shutdown").dispatch_generation)
    store.claim_next(worker_id=OLD, environments=["face_swap"], lease_seconds=1)
    reaped = store.reap_expired_leases(now=utcnow() + AFTER_LEASE)
    generations.append(reaped[0].dispatch_generation)
    _claimed_by(store, NEW)
    retried = store.fail_or_retry(task.taskId, worker_id=NEW, error=TransientError("blip", code="blip"))
    generations.append(retried.dispatch_generation)

    assert generations == sorted(set(generations)), generations


def test_a_push_claim_waits_for_the_retry_backoff(store: TaskStore) -> None:
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))
    _claimed_by(store, OLD)
    store.fail_or_retry(
        task.taskId, worker_id=OLD, error=TransientError("blip", code="blip"), retry_delay_s=30
    )

    with pytest.raises(Conflict) as raised:
        store.claim(task.taskId, worker_id=NEW, lease_seconds=LEASE_S)

    assert raised.value.code == "not_available_yet"
    assert 1 <= raised.value.details["retry_after_s"] <= 30
    assert store.get_or_raise(task.taskId).status == TaskStatus.PENDING
