"""The fleet as an admin sees it: the numbers behind GET /api/admin/stats and the console.

The same numbers the metrics carry (infra/terraform/monitoring.tf turns the
``queue_stats`` and ``task_finished`` log events into them): queue length and the age of
the oldest PENDING task, tasks finished per minute and failures by code over the last
hour, and the runners holding leases with their in-flight work. All of it is read from
the task store, so looking at it never wakes a GPU runner.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from typing import Any

from shared.store import TaskStore
from shared.tasks import LEASED_STATUSES, Task, TaskStatus, utcnow

__all__ = ["WINDOW_S", "fleet_stats"]

WINDOW_S = 3600
BUCKET_S = 60
# Bounds on what one call reads: a busier hour is reported as truncated, never slower.
MAX_FINISHED = 2000
MAX_IN_FLIGHT = 500


def _minute_buckets(finished: list[Task], start: dt.datetime) -> list[dict[str, Any]]:
    counts: list[Counter[str]] = [Counter() for _ in range(WINDOW_S // BUCKET_S)]
    for task in finished:
        assert task.finished_at is not None  # finished_since only returns ended tasks
        index = int((task.finished_at - start).total_seconds() // BUCKET_S)
        if 0 <= index < len(counts):
            counts[index][task.status.value.lower()] += 1
    return [
        {
            "start": (start + dt.timedelta(seconds=index * BUCKET_S)).isoformat(),
            **{outcome: bucket[outcome] for outcome in ("completed", "failed", "cancelled")},
        }
        for index, bucket in enumerate(counts)
    ]


def _runners(in_flight: list[Task]) -> list[dict[str, Any]]:
    by_owner: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task in in_flight:
        owner = task.lease.owner if task.lease is not None else "(no lease)"
        by_owner[owner].append(
            {
                "task_id": task.taskId,
                "status": task.status.value,
                "workflow": task.workflow,
                "progress": task.progress.model_dump() if task.progress is not None else None,
                "started_at": task.started_at.isoformat() if task.started_at else None,
                "lease_expires_at": task.lease.expires_at.isoformat() if task.lease is not None else None,
            }
        )
    return [{"worker_id": owner, "in_flight": tasks} for owner, tasks in sorted(by_owner.items())]


def fleet_stats(store: TaskStore, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Queue, last hour's throughput and failures by code, runners and their work."""
    now = now or utcnow()
    # Whole minutes, so a chart refreshed within a minute keeps its bars where they were.
    end = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    start = end - dt.timedelta(seconds=WINDOW_S)
    queue = store.queue_stats()
    finished = store.finished_since(start, limit=MAX_FINISHED)
    in_flight = store.list_tasks(statuses=sorted(LEASED_STATUSES), limit=MAX_IN_FLIGHT)
    failures = Counter(
        (task.error.code if task.error is not None else "unknown")
        for task in finished
        if task.status == TaskStatus.FAILED
    )
    outcomes = Counter(task.status.value.lower() for task in finished)
    return {
        "generated_at": now.isoformat(),
        "queue": {"queue_length": queue.queue_length, **queue.model_dump()},
        "last_hour": {
            "window_s": WINDOW_S,
            "bucket_s": BUCKET_S,
            "start": start.isoformat(),
            "per_minute": _minute_buckets(finished, start),
            "finished": {name: outcomes.get(name, 0) for name in ("completed", "failed", "cancelled")},
            "failures_by_code": dict(failures.most_common()),
            "truncated": len(finished) >= MAX_FINISHED,
        },
        "runners": _runners(in_flight),
        "in_flight_truncated": len(in_flight) >= MAX_IN_FLIGHT,
    }
