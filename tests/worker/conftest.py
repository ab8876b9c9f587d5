"""The worker in process: gpu_runner.worker.Worker (or the whole RunnerState behind the
runner's Starlette app, over ASGI in the same event loop) on a real SQLite task store and
real local storage, with an engine the test steers.

The engine is the only stand-in: it does no media work, it waits for the test to let
each phase go (a download that hangs, an engine that runs until released) and honours
cancel as the interface asks. Everything the tests look at (leases, statuses, results)
is read back from the store the worker writes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gpu_runner.engines.base import Engine, EngineOutput, EngineResult, PreparedJob, ProgressCallback
from shared.settings import Settings
from shared.storage.local import LocalStorage
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, TaskParams

LEASE_SECONDS = 5  # the smallest lease Settings allows: heartbeats every ~1.7 s


class SteeredEngine(Engine):
    """``prepare`` waits for ``download_done``; ``run`` waits for ``engine_done`` or cancel."""

    name = "face_swap"

    def __init__(self) -> None:
        self.download_started = asyncio.Event()
        self.download_done = asyncio.Event()
        self.download_done.set()  # downloads are instant unless a test clears this
        self.engine_started = asyncio.Event()
        self.engine_done = asyncio.Event()
        self.saw_cancel = False
        self.runs = 0

    async def prepare(self, task: Task, workdir: Path) -> PreparedJob:
        self.download_started.set()
        await self.download_done.wait()
        return PreparedJob(task=task, workdir=workdir)

    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        self.runs += 1
        self.engine_started.set()
        finished = asyncio.ensure_future(self.engine_done.wait())
        cancelled = asyncio.ensure_future(cancel.wait())
        await asyncio.wait({finished, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()
        cancelled.cancel()
        if cancel.is_set():
            self.saw_cancel = True
            return EngineResult(outputs=[])
        path = job.workdir / "out.png"
        await asyncio.to_thread(Image.new("RGB", (8, 8), "white").save, path)
        return EngineResult(outputs=[EngineOutput(path=path, content_type="image/png", width=8, height=8)])


def face_swap_task() -> Task:
    return Task(
        workflow="face_swap",
        environment="face_swap",
        params=TaskParams(
            input_data={"source_url": "https://example.com/s.jpg", "target_url": "https://example.com/t.jpg"}
        ),
    )


@dataclasses.dataclass
class LeaseRenewals:
    """When each new lease expiry was first seen (monotonic seconds), sampled every 20 ms."""

    seen: list[tuple[float, Any]] = dataclasses.field(default_factory=list)

    def between(self, start: float, end: float) -> list[float]:
        return [at for at, _ in self.seen if start <= at <= end]

    def largest_gap(self, start: float, end: float) -> float:
        """The longest time in [start, end] without a renewal."""
        marks = [start, *self.between(start, end), end]
        return max(later - earlier for earlier, later in itertools.pairwise(marks))


@contextlib.contextmanager
def watching_lease(store: SQLiteTaskStore, task_id: str) -> Iterator[LeaseRenewals]:
    """Read the task's lease from the store in a thread of its own, as another process would."""
    renewals = LeaseRenewals()
    stop = threading.Event()

    def sample() -> None:
        last = None
        while not stop.is_set():
            task = store.get(task_id)
            expires_at = task.lease.expires_at if task and task.lease else None
            if expires_at is not None and expires_at != last:
                renewals.seen.append((time.monotonic(), expires_at))
                last = expires_at
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield renewals
    finally:
        stop.set()
        thread.join(timeout=5)


async def until(predicate: Callable[[], bool], *, timeout_s: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` on the loop until true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", lease_seconds=LEASE_SECONDS, shutdown_grace_s=1.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteTaskStore]:
    task_store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    yield task_store
    task_store.close()


@pytest.fixture
def results(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "results", "http://127.0.0.1:1/results")
