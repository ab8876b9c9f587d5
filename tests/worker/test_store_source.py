"""gpu_runner.sources.StoreTaskSource on a real SQLite store: how many claims a runner makes.

A runner waiting for work used to claim at the start of every fetch: after each task it
took, the next fetch claimed again and found nothing (a thread hop and three queries per
job, figure 8). The claim now looks, in the same hop, whether more work is claimable, so
a runner that works through tasks arriving one at a time claims once per task, while a
backlog and a retry backoff's end are still claimed without waiting for a notification.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import time
from pathlib import Path

import pytest

from gpu_runner.sources import StoreTaskSource
from shared.settings import Settings
from shared.store.base import Claim
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, utcnow

from .conftest import face_swap_task

pytestmark = pytest.mark.timeout(60)

ENVIRONMENTS = ["face_swap"]
# Far longer than any claim takes on a busy machine: a fetch that waits this long waited
# for a notification that never came.
LONG_WAIT_S = 30.0


class CountingStore(SQLiteTaskStore):
    """The real SQLite store, counting the claims made on it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claims = 0

    def _claim(self, claim: Claim) -> Task | None:
        self.claims += 1
        return super()._claim(claim)


@pytest.fixture
def counting_store(tmp_path: Path):
    store = CountingStore(tmp_path / "tasks.sqlite3")
    yield store
    store.close()


def test_a_runner_working_through_tasks_one_at_a_time_claims_once_per_task(settings, counting_store) -> None:
    source = StoreTaskSource(counting_store, settings)

    async def scenario() -> list[str]:
        claimed: list[str] = []
        # The first fetch finds an empty queue (one claim) and waits for work.
        fetching = asyncio.ensure_future(
            source.next_task(worker_id="runner-1", environments=ENVIRONMENTS, wait_s=LONG_WAIT_S)
        )
        for _ in range(4):
            await asyncio.sleep(0.05)  # the fetch is waiting when the task arrives
            created = await asyncio.to_thread(counting_store.create, face_swap_task())
            task = await asyncio.wait_for(fetching, timeout=LONG_WAIT_S)
            assert task is not None and task.taskId == created.taskId
            claimed.append(task.taskId)
            # As the pull loop does: the next fetch starts as soon as a task is taken.
            fetching = asyncio.ensure_future(
                source.next_task(worker_id="runner-1", environments=ENVIRONMENTS, wait_s=LONG_WAIT_S)
            )
        await asyncio.sleep(0.2)
        fetching.cancel()
        await asyncio.gather(fetching, return_exceptions=True)
        await source.close()
        return claimed

    claimed = asyncio.run(scenario())

    assert len(claimed) == 4
    # One claim that found the queue empty, then one per task: none after a task was taken.
    assert counting_store.claims == 1 + 4


def test_a_backlog_is_claimed_task_after_task_without_waiting(settings, counting_store) -> None:
    backlog = [counting_store.create(face_swap_task()).taskId for _ in range(3)]
    source = StoreTaskSource(counting_store, settings)

    async def scenario() -> tuple[list[str], float]:
        started = time.monotonic()
        claimed = []
        for _ in backlog:
            task = await source.next_task(worker_id="runner-1", environments=ENVIRONMENTS, wait_s=LONG_WAIT_S)
            assert task is not None
            claimed.append(task.taskId)
        elapsed = time.monotonic() - started
        await source.close()
        return claimed, elapsed

    claimed, elapsed = asyncio.run(scenario())

    assert sorted(claimed) == sorted(backlog)
    # Published before the source subscribed: only the probe after each claim finds them.
    assert elapsed < LONG_WAIT_S / 2


def test_a_task_in_retry_backoff_is_claimed_when_its_backoff_ends(settings: Settings, counting_store) -> None:
    source = StoreTaskSource(counting_store, settings)
    first = counting_store.create(face_swap_task())
    later = face_swap_task()
    later.available_at = utcnow() + dt.timedelta(seconds=1.0)

    async def scenario() -> tuple[Task | None, Task | None, float]:
        taken = await source.next_task(worker_id="runner-1", environments=ENVIRONMENTS, wait_s=LONG_WAIT_S)
        await asyncio.to_thread(counting_store.create, later)
        started = time.monotonic()
        backed_off = await source.next_task(
            worker_id="runner-1", environments=ENVIRONMENTS, wait_s=LONG_WAIT_S
        )
        waited = time.monotonic() - started
        await source.close()
        return taken, backed_off, waited

    taken, backed_off, waited = asyncio.run(scenario())

    assert taken is not None and taken.taskId == first.taskId
    assert backed_off is not None and backed_off.taskId == later.taskId
    assert waited < LONG_WAIT_S / 2  # woken at the backoff's end, not at the fetch's


class FailingOnceStore(CountingStore):
    """The real SQLite store whose next claim fails (a locked or full database) when armed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail_next = False

    def _claim(self, claim: Claim) -> Task | None:
        if self.fail_next:
            self.fail_next = False
            self.claims += 1
            raise sqlite3.OperationalError("database is locked")
        return super()._claim(claim)


def test_a_change_whose_claim_failed_is_claimed_by_the_next_fetch(settings, tmp_path: Path) -> None:
    """A claim that raises must not use up the change that prompted it: the pull loop's next
    fetch claims at once. Before, the notification was cleared and the fetch waited for the
    next change or the end of its long poll (up to 25 s with fetch_task's)."""
    store = FailingOnceStore(tmp_path / "tasks.sqlite3")
    source = StoreTaskSource(store, settings)

    async def scenario() -> tuple[Task | None, float]:
        # An empty queue: the fetch claims once, finds nothing, and waits for a change.
        fetching = asyncio.ensure_future(
            source.next_task(worker_id="runner-1", environments=ENVIRONMENTS, wait_s=LONG_WAIT_S)
        )
        await asyncio.sleep(0.05)
        store.fail_next = True
        await asyncio.to_thread(store.create, face_swap_task())
        with pytest.raises(sqlite3.OperationalError):
            await asyncio.wait_for(fetching, timeout=LONG_WAIT_S)
        # As the pull loop does after a failed fetch: it fetches again.
        started = time.monotonic()
        task = await asyncio.wait_for(
            source.next_task(worker_id="runner-1", environments=ENVIRONMENTS, wait_s=LONG_WAIT_S),
            timeout=LONG_WAIT_S,
        )
        waited = time.monotonic() - started
        await source.close()
        return task, waited

    try:
        task, waited = asyncio.run(scenario())
    finally:
        store.close()

    assert task is not None
    assert waited < LONG_WAIT_S / 2  # claimed at once, not at the long poll's end
    assert store.claims == 3  # the empty queue, the failed claim, the one that took it
