"""SIGTERM while the pull loop waits in a long poll: drain stops the fetch at once instead
of waiting out its wait (up to 25 s), and nothing is claimed afterwards in the name of the
runner that stopped, whichever source it pulls from: the store on its machine, or the
task API (a real ``comfyswap api`` process) over HTTP."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpu_runner.app import task_source
from gpu_runner.sources import HttpTaskSource, StoreTaskSource, TaskSource
from gpu_runner.worker import Worker
from shared.settings import Settings
from shared.storage.local import LocalStorage
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import TaskStatus
from tests.servers import ServerProcess, free_port, start_server

from .conftest import SteeredEngine, face_swap_task, until

pytestmark = pytest.mark.timeout(120)

# A long poll of 25 s (the API's cap; the lease allows twice that). Drain must end far
# sooner, with room for a busy machine: before this fix it waited the poll out, and more.
FETCH_WAIT_S = 25.0
DRAIN_BOUND_S = 10.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", lease_seconds=60, shutdown_grace_s=1.0)


@pytest.fixture
def store(settings: Settings) -> Iterator[SQLiteTaskStore]:
    task_store = SQLiteTaskStore(settings.sqlite_path)
    yield task_store
    task_store.close()


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[ServerProcess]:
    """The local API on the same DATA_DIR, as `make run` starts it."""
    port = free_port()
    server = start_server(
        "api",
        [sys.executable, "-m", "comfyswap.cli", "api"],
        url=f"http://127.0.0.1:{port}",
        log_dir=tmp_path,
        env={"DATA_DIR": str(settings.data_dir), "API_PORT": str(port), "LOG_LEVEL": "WARNING"},
        health_path="/api/health",
        timeout_s=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    yield server
    server.stop()


def _drain_while_fetching(settings: Settings, store: SQLiteTaskStore, source: TaskSource) -> float:
    """Start pulling with nothing to claim; once the long poll is under way, drain. Returns
    how long drain took (TimeoutError past DRAIN_BOUND_S)."""
    results = LocalStorage(settings.data_dir / "results", "http://127.0.0.1:1/results")
    worker = Worker(
        settings, store, {"face_swap": SteeredEngine()}, results.upload_file, source=source, prefetch=0
    )

    async def scenario() -> float:
        pulling = asyncio.ensure_future(worker.run_pull_loop(wait_s=FETCH_WAIT_S))
        await until(lambda: worker.fetch is not None, what="the long poll")
        await asyncio.sleep(1.0)  # the poll reaches its wait (the API's, over HTTP)
        started = time.monotonic()
        await asyncio.wait_for(worker.drain(grace_s=1.0), timeout=DRAIN_BOUND_S)
        await asyncio.wait_for(pulling, timeout=5)
        return time.monotonic() - started

    return asyncio.run(scenario())


def test_drain_stops_a_long_poll_on_the_store_at_once(settings, store) -> None:
    drain_s = _drain_while_fetching(settings, store, StoreTaskSource(store, settings))

    task = store.create(face_swap_task())
    claimed = store.claim_next(worker_id="another-runner", environments=["face_swap"], lease_seconds=60)
    assert drain_s < DRAIN_BOUND_S
    assert claimed is not None and claimed.taskId == task.taskId


def test_drain_stops_a_long_poll_on_the_task_api_and_the_api_claims_nothing_for_it(
    settings, store, api
) -> None:
    drain_s = _drain_while_fetching(settings, store, HttpTaskSource(f"{api.url}/api"))

    # The API's side of the stopped poll is still waiting: a new task wakes it, and it must
    # see that its runner hung up rather than lease the task to nobody.
    task = store.create(face_swap_task())
    fetched = httpx.get(
        f"{api.url}/api/comm/task/fetch",
        params={"worker_id": "another-runner", "environments": "face_swap", "wait": "10"},
        timeout=30,
    ).json()["data"]

    assert drain_s < DRAIN_BOUND_S
    assert fetched is not None and fetched["taskId"] == task.taskId
    assert store.get_or_raise(task.taskId).status == TaskStatus.FETCHED


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, StoreTaskSource),  # the embedded SQLite store: API and runner on one machine
        ({"pull_source": "api"}, HttpTaskSource),
        ({"task_store": "firestore"}, HttpTaskSource),
        ({"task_store": "firestore", "pull_source": "store"}, StoreTaskSource),
    ],
)
def test_a_runner_pulls_from_its_store_when_that_is_the_embedded_one(options, expected, store) -> None:
    assert isinstance(task_source(Settings(**options), store), expected)
