"""The pull loop outlives a failed fetch, whatever raised it.

A runner whose pull loop ended still answers health checks and writes its heartbeat (the
runner-down alert stays quiet) but claims nothing more: every task waits PENDING until
someone restarts it. The failure here is a real one of the embedded store: another
process holds SQLite's write lock past the store's busy timeout, and the claim raises
``sqlite3.OperationalError`` (no ComfySwapError).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from gpu_runner.sources import StoreTaskSource
from gpu_runner.worker import Worker
from shared.settings import Settings
from shared.storage.local import LocalStorage
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import TaskStatus

from .conftest import SteeredEngine, face_swap_task

pytestmark = pytest.mark.timeout(120)


def test_a_claim_the_store_fails_does_not_end_the_pull_loop(
    settings: Settings, results: LocalStorage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.sqlite3"
    store = SQLiteTaskStore(path, busy_timeout_s=0.2)
    store.queue_stats()  # the schema exists before another process locks the file
    engine = SteeredEngine()
    engine.engine_done.set()  # jobs end as soon as they start
    source = StoreTaskSource(store, settings)
    worker = Worker(settings, store, {"face_swap": engine}, results.upload_file, source=source, prefetch=0)
    other_process = sqlite3.connect(path, isolation_level=None)
    caplog.set_level(logging.INFO)

    async def scenario() -> tuple[TaskStatus, bool]:
        other_process.execute("BEGIN IMMEDIATE")  # holds the write lock
        pulling = asyncio.ensure_future(worker.run_pull_loop(wait_s=1.0))
        deadline = time.monotonic() + 60
        while (
            not pulling.done()
            and not any(getattr(record, "event", "") == "fetch_failed" for record in caplog.records)
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.02)
        other_process.execute("ROLLBACK")
        created = await asyncio.to_thread(store.create, face_swap_task())
        while (
            (status := (await asyncio.to_thread(store.get_or_raise, created.taskId)).status)
            == TaskStatus.PENDING
            and not pulling.done()
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.02)
        alive = not pulling.done()
        await asyncio.wait_for(worker.drain(grace_s=5.0), timeout=60)
        await asyncio.gather(pulling, return_exceptions=True)
        await source.close()
        return status, alive

    try:
        status, alive = asyncio.run(scenario())
    finally:
        other_process.close()
        store.close()

    assert alive, "the pull loop ended on a failed claim"
    assert status != TaskStatus.PENDING
