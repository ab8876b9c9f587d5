"""The orphan sweep (issue 19 #4): no result object without a task that points to it.

Local storage and an SQLite store, with objects a crash, a cancel during an upload and a
fallback race leave behind; the sweep removes those and keeps what a task needs.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from shared.errors import JobFailed
from shared.inputs import InputStore
from shared.storage.chain import StorageChain
from shared.storage.local import LocalStorage
from shared.storage.orphans import sweep_orphans
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, utcnow

HOUR_AGO = (utcnow() - dt.timedelta(hours=1)).timestamp()


def _put(storage: LocalStorage, key: str, *, old: bool = True) -> None:
    storage.put_bytes(key, b"bytes", "image/png")
    if old:
        path = storage.path_for(key)
        os.utime(path, (HOUR_AGO, HOUR_AGO))


def _task(store: SQLiteTaskStore) -> Task:
    return store.create(Task(workflow="face_swap", environment="face_swap", owner="a"))


def test_the_sweep_removes_what_no_live_task_points_to(tmp_path: Path) -> None:
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    primary = LocalStorage(tmp_path / "results", "http://results")
    fallback = LocalStorage(tmp_path / "fallback", "http://fallback")
    fallback.name = "fallback"
    inputs = InputStore(LocalStorage(tmp_path / "inputs", "", key_prefix="inputs/"))

    done = _task(store)
    store.claim_next(worker_id="r", environments=["face_swap"], lease_seconds=60)
    store.complete(
        done.taskId,
        worker_id="r",
        output_data={"outputs": [{"provider": "fallback", "key": f"results/{done.taskId}/000.png"}]},
    )
    failed = _task(store)
    store.claim_next(worker_id="r", environments=["face_swap"], lease_seconds=60)
    store.fail_or_retry(failed.taskId, worker_id="r", error=JobFailed("no face", code="no_face"))
    running = _task(store)
    store.claim_next(worker_id="r", environments=["face_swap"], lease_seconds=60)

    _put(fallback, f"results/{done.taskId}/000.png")  # the result the task points to
    _put(primary, f"results/{done.taskId}/000.png")  # a late copy: the primary timed out
    _put(primary, f"results/{failed.taskId}/000.png")  # cancelled or failed during upload
    _put(primary, "results/task_" + "0" * 32 + "/000.png")  # its task is gone
    _put(primary, f"results/{running.taskId}/000.png")  # still uploading: kept
    _put(primary, "results/task_" + "1" * 32 + "/000.png", old=False)  # too new to judge
    inputs.provider.put_bytes(f"inputs/{failed.taskId}/source_url", b"face", "image/jpeg")
    inputs.provider.put_bytes(f"inputs/{running.taskId}/source_url", b"face", "image/jpeg")
    for key, _ in inputs.provider.list_keys("inputs/"):
        os.utime(inputs.provider.path_for(key), (HOUR_AGO, HOUR_AGO))  # type: ignore[attr-defined]

    removed = sweep_orphans(StorageChain([primary, fallback]), store, inputs, older_than_s=60)

    assert removed == 4
    assert sorted(key for key, _ in primary.list_keys("results/")) == sorted(
        [f"results/{running.taskId}/000.png", "results/task_" + "1" * 32 + "/000.png"]
    )
    assert [key for key, _ in fallback.list_keys("results/")] == [f"results/{done.taskId}/000.png"]
    assert [key for key, _ in inputs.provider.list_keys("inputs/")] == [f"inputs/{running.taskId}/source_url"]
    store.close()
