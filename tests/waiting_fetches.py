"""Many runners' fetch_task long polls waiting in one process (one API instance), for
the tests of who wakes when a task arrives (issue 14)."""

from __future__ import annotations

import threading
import time
from typing import Any

from shared.service import TaskService
from shared.store.base import TaskStore
from shared.tasks import Task


def count_claims(store: TaskStore) -> list[str]:
    """Every claim of ``store`` from now on: the task id, or "" when it found nothing
    (counted around the store's real claim_next)."""
    claims: list[str] = []
    real_claim_next = store.claim_next

    def counted_claim_next(**kwargs: Any) -> Task | None:
        task = real_claim_next(**kwargs)
        claims.append(task.taskId if task else "")
        return task

    store.claim_next = counted_claim_next  # type: ignore[method-assign]  # the real claim, counted
    return claims


def start_waiting_fetches(
    service: TaskService, store: TaskStore, count: int, deadline_s: float = 60.0
) -> tuple[list[threading.Thread], dict[int, Task | None], list[str]]:
    """``count`` long polls in threads, returned once each one's first claim found nothing
    (it waits next). ``claims`` records every claim of ``store`` from then on: the task id,
    or "" for none (counted around the store's real claim_next)."""
    claims = count_claims(store)
    fetched: dict[int, Task | None] = {}

    def fetch(index: int) -> None:
        fetched[index] = service.fetch_for_runner(
            worker_id=f"runner-{index}", environments=["face_swap"], wait_s=25.0
        )

    threads = [threading.Thread(target=fetch, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + deadline_s
    while len(claims) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert claims == [""] * count, claims
    return threads, fetched, claims
