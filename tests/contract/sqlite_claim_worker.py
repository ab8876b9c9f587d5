"""A separate process claiming from one SQLite file (spawned by the contention test).

Lives in its own small module so a spawned child imports only this and the store.
"""

from __future__ import annotations

import time
from typing import Any

from shared.store.sqlite import SQLiteTaskStore


def claim_until_empty(path: str, worker_id: str, start: Any, results: Any) -> None:
    """Claim every task it can, then report the ids it got as (worker_id, ids, error)."""
    claimed: list[str] = []
    error = ""
    store = SQLiteTaskStore(path)
    try:
        start.wait(60)
        while (
            task := store.claim_next(worker_id=worker_id, environments=["face_swap"], lease_seconds=60)
        ) is not None:
            claimed.append(task.taskId)
            time.sleep(0.002)  # a runner works between claims; lets the others in
    except Exception as exc:  # reported to the parent, which fails the test with it
        error = repr(exc)
    finally:
        store.close()
    results.put((worker_id, claimed, error))
