"""gpu_runner.worker.Worker on its own: leases, heartbeats, cancel, drain and push answers.

Every scenario drives the real Worker on a real SQLite store in one event loop; the
engine is steered by the test (tests/worker/conftest.py) and every assertion reads the
task back from the store, as the API would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_runner.app import RunnerState, create_app
from gpu_runner.worker import StoreTaskSource, Worker
from shared.settings import Settings
from shared.storage.local import LocalStorage
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, TaskStatus, utcnow

from .conftest import LEASE_SECONDS, SteeredEngine, face_swap_task, until, watching_lease

pytestmark = pytest.mark.timeout(60)


def _worker(
    settings: Settings, store: SQLiteTaskStore, engine: SteeredEngine, results: LocalStorage
) -> Worker:
    return Worker(settings, store, {"face_swap": engine}, results.upload_file)


def _pulling_worker(
    settings: Settings, store: SQLiteTaskStore, engine: SteeredEngine, results: LocalStorage
) -> Worker:
    source = StoreTaskSource(store, settings)
    return Worker(settings, store, {"face_swap": engine}, results.upload_file, source=source, prefetch=0)


async def pushed_into_the_engine(
    worker: Worker, engine: SteeredEngine, task_id: str
) -> asyncio.Future[tuple[int, dict[str, Any]]]:
    """Deliver ``task_id`` as a push; return the delivery once its job is in the engine."""
    running = asyncio.ensure_future(worker.run_pushed(task_id))
    await asyncio.wait_for(engine.engine_started.wait(), timeout=20)
    return running


def test_heartbeats_keep_the_lease_of_a_long_job(settings, store, results) -> None:
    engine = SteeredEngine()
    worker = _worker(settings, store, engine, results)
    task = store.create(face_swap_task())

    async def scenario() -> tuple[int, dict[str, Any]]:
        running = await pushed_into_the_engine(worker, engine, task.taskId)
        await asyncio.sleep(LEASE_SECONDS * 1.5)  # longer than one lease: only renewals keep it
        engine.engine_done.set()
        return await asyncio.wait_for(running, timeout=20)

    with watching_lease(store, task.taskId) as renewals:
        code, body = asyncio.run(scenario())

    final = store.get_or_raise(task.taskId)
    assert (code, body["status"]) == (200, "COMPLETED")
    assert final.status == TaskStatus.COMPLETED and final.output_data["provider"] == "local"
    assert len(renewals.seen) >= 3, "claim, then at least two renewals"
    expiries = [expires_at for _, expires_at in renewals.seen]
    assert expiries == sorted(expiries), "each renewal pushes the expiry later"
    assert not (settings.data_dir / "work" / task.taskId).exists(), "the job folder is removed"


def test_a_lost_lease_stops_the_engine_and_writes_nothing(settings, store, results) -> None:
    """The reaper re-queued the task (this runner looked dead): this worker stops its engine
    and writes nothing over the re-queued task (no result, no status)."""
    engine = SteeredEngine()
    worker = _worker(settings, store, engine, results)
    task = store.create(face_swap_task())

    async def scenario() -> tuple[int, dict[str, Any]]:
        running = await pushed_into_the_engine(worker, engine, task.taskId)
        later = utcnow() + dt.timedelta(seconds=LEASE_SECONDS + 1)
        reaped = await asyncio.to_thread(store.reap_expired_leases, later)
        assert [reaped_task.taskId for reaped_task in reaped] == [task.taskId]
        return await asyncio.wait_for(running, timeout=20)

    code, body = asyncio.run(scenario())

    final = store.get_or_raise(task.taskId)
    assert engine.saw_cancel, "the engine was told to stop"
    assert final.status == TaskStatus.PENDING and final.lease is None and final.output_data is None
    assert [attempt["code"] for attempt in final.attempt_history] == ["lease_expired"]
    # PENDING again: the delivery asks Cloud Tasks to come back (the claim decides who runs it).
    assert (code, body["status"]) == (503, "retry"), body
    assert not any(results.root.rglob("*.png")), "nothing uploaded by the runner that lost the lease"


def test_cancel_during_download_stops_before_the_engine(settings, store, results) -> None:
    engine = SteeredEngine()
    engine.download_done.clear()  # the inputs hang
    worker = _worker(settings, store, engine, results)
    task = store.create(face_swap_task())

    async def scenario() -> tuple[int, dict[str, Any]]:
        running = asyncio.ensure_future(worker.run_pushed(task.taskId))
        await asyncio.wait_for(engine.download_started.wait(), timeout=20)
        await asyncio.to_thread(store.cancel, task.taskId)
        return await asyncio.wait_for(running, timeout=20)

    code, body = asyncio.run(scenario())

    assert (code, body["status"]) == (200, "CANCELLED")
    assert store.get_or_raise(task.taskId).status == TaskStatus.CANCELLED
    assert engine.runs == 0, "a cancelled task never reaches the engine"
    assert worker.in_flight == {} and not worker.busy


def test_drain_releases_what_cannot_finish_within_the_grace(settings, store, results) -> None:
    """SIGTERM: stop claiming, let in-flight work finish within the grace, give back the rest
    (PENDING again, for another runner) instead of leaving it leased to a runner that is gone."""
    engine = SteeredEngine()
    worker = _pulling_worker(settings, store, engine, results)
    task = store.create(face_swap_task())

    async def scenario() -> tuple[int, dict[str, Any]]:
        pulling = asyncio.ensure_future(worker.run_pull_loop(wait_s=0.5))
        await asyncio.wait_for(engine.engine_started.wait(), timeout=20)
        await asyncio.wait_for(worker.drain(grace_s=0.3), timeout=30)
        await asyncio.wait_for(pulling, timeout=20)
        return await worker.run_pushed(store.create(face_swap_task()).taskId)

    code, body = asyncio.run(scenario())

    released = store.get_or_raise(task.taskId)
    assert engine.saw_cancel
    assert released.status == TaskStatus.PENDING and released.lease is None
    assert (code, body["status"]) == (503, "draining") and body["retry_after_s"] > 0


def test_drain_lets_work_finish_within_the_grace(settings, store, results) -> None:
    engine = SteeredEngine()
    worker = _pulling_worker(settings, store, engine, results)
    task = store.create(face_swap_task())

    async def scenario() -> None:
        pulling = asyncio.ensure_future(worker.run_pull_loop(wait_s=0.5))
        await asyncio.wait_for(engine.engine_started.wait(), timeout=20)
        later = await asyncio.to_thread(store.create, face_swap_task())
        draining = asyncio.ensure_future(worker.drain(grace_s=20))
        await until(lambda: worker.draining, what="draining")
        engine.engine_done.set()
        await asyncio.wait_for(draining, timeout=30)
        await asyncio.wait_for(pulling, timeout=20)
        assert store.get_or_raise(later.taskId).status == TaskStatus.PENDING, "nothing claimed while draining"

    asyncio.run(scenario())

    assert store.get_or_raise(task.taskId).status == TaskStatus.COMPLETED


def test_push_answers_429_when_busy_and_503_while_draining_with_retry_after(tmp_path: Path, store) -> None:
    """What Cloud Tasks sees on the push endpoint: a full runner says 429 and a draining one
    503, each with Retry-After, so the delivery is retried later instead of lost."""
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=LEASE_SECONDS, engine_slots=1)
    engine = SteeredEngine()
    state = RunnerState(settings, store=store, engines={"face_swap": engine}, pull=False)
    app = create_app(settings, state=state)
    capacity = state.worker.capacity  # one engine slot plus one task downloading ahead
    tasks = [store.create(face_swap_task()) for _ in range(capacity + 1)]

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:

            def push(task_id: str) -> asyncio.Future[httpx.Response]:
                return asyncio.ensure_future(client.post("/internal/tasks/run", json={"task_id": task_id}))

            holding = [push(task.taskId) for task in tasks[:capacity]]
            # Every hold taken and every claimed task in process (a drain releases those).
            await until(lambda: len(state.worker.in_flight) == capacity, what="every hold in process")
            assert state.worker.busy
            busy = await push(tasks[capacity].taskId)
            draining = asyncio.ensure_future(state.worker.drain(grace_s=0.2))
            await until(lambda: state.worker.draining, what="draining")
            refused = await push(tasks[capacity].taskId)
            await draining
            finished = await asyncio.gather(*holding)
            return [busy, refused, *finished]

    busy, refused, *finished = asyncio.run(scenario())

    assert busy.status_code == 429 and int(busy.headers["Retry-After"]) > 0, busy.text
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.text
    assert store.get_or_raise(tasks[capacity].taskId).status == TaskStatus.PENDING, "left for the retry"
    assert all(response.status_code in (200, 503) for response in finished)
    assert all(store.get_or_raise(task.taskId).status == TaskStatus.PENDING for task in tasks[:capacity])


def test_push_of_a_task_in_retry_backoff_answers_503_with_its_wait(settings, store, results) -> None:
    from shared.errors import TransientError

    engine = SteeredEngine()
    worker = _worker(settings, store, engine, results)
    task = store.create(face_swap_task())
    claimed = store.claim(task.taskId, worker_id="runner-a", lease_seconds=LEASE_SECONDS)
    store.fail_or_retry(
        claimed.taskId,
        worker_id="runner-a",
        error=TransientError("upstream hiccup", code="upstream_unavailable"),
        retry_delay_s=30,
    )
    engine.engine_done.set()  # were it claimed anyway, the job ends at once and the test fails

    code, body = asyncio.run(worker.run_pushed(task.taskId))

    assert store.get_or_raise(task.taskId).status == TaskStatus.PENDING
    assert (code, body["status"]) == (503, "not_available_yet") and body["retry_after_s"] >= 1
    assert engine.runs == 0


class _ClaimHeldStore(SQLiteTaskStore):
    """The real SQLite store whose ``claim`` commits, then waits until the test lets it
    return: the window in which a push delivery has its task but the worker does not
    know it yet."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claimed = threading.Event()
        self.may_return = threading.Event()

    def claim(self, task_id: str, *, worker_id: str, lease_seconds: float) -> Task:
        task = super().claim(task_id, worker_id=worker_id, lease_seconds=lease_seconds)
        self.claimed.set()
        self.may_return.wait(timeout=30)
        return task


def test_a_push_claimed_as_drain_begins_is_released_not_run(settings, results, tmp_path: Path) -> None:
    """SIGTERM lands while a push delivery's claim is in flight: drain cannot see that task
    yet, so the delivery must give it back (PENDING, enqueued again) rather than run it to
    the end past the grace on a runner that is going away."""
    store = _ClaimHeldStore(tmp_path / "held-claims.sqlite3")
    try:
        engine = SteeredEngine()
        engine.engine_done.set()  # were it run, the job would finish at once and the test fail
        worker = _worker(settings, store, engine, results)
        requeued: list[str] = []
        worker.on_requeued = lambda task: requeued.append(task.taskId)
        task = store.create(face_swap_task())

        async def scenario() -> tuple[int, dict[str, Any]]:
            delivery = asyncio.ensure_future(worker.run_pushed(task.taskId))
            await until(store.claimed.is_set, what="the claim committed")
            draining = asyncio.ensure_future(worker.drain(grace_s=5))
            await until(lambda: worker.draining, what="draining")
            store.may_return.set()
            answer = await asyncio.wait_for(delivery, timeout=30)
            await asyncio.wait_for(draining, timeout=30)
            return answer

        code, body = asyncio.run(scenario())

        final = store.get_or_raise(task.taskId)
        assert engine.runs == 0, "the engine ran a task claimed after drain began"
        assert final.status == TaskStatus.PENDING and final.lease is None, final
        assert final.attempts == 0, "a release does not count an attempt"
        assert requeued == [task.taskId], "released tasks are enqueued again at once"
        assert (code, body["status"]) == (200, "released"), body
        assert worker.in_flight == {} and not worker.busy
    finally:
        store.close()


def test_a_job_shorter_than_the_processing_write_delay_still_records_when_it_started(
    settings, store, results
) -> None:
    """A short job goes FETCHED -> COMPLETED with no PROCESSING write (one store write
    fewer); its finished task still says when it went on the engine, as every finished
    task did before (clients read finished_at - started_at as the processing time)."""
    engine = SteeredEngine()
    engine.engine_done.set()  # the engine returns at once: well under the delay
    worker = _pulling_worker(settings, store, engine, results)
    task = store.create(face_swap_task())

    async def scenario() -> None:
        pulling = asyncio.ensure_future(worker.run_pull_loop(wait_s=0.5))
        await until(lambda: store.get_or_raise(task.taskId).status == TaskStatus.COMPLETED, what="COMPLETED")
        await worker.drain(grace_s=5)
        await asyncio.wait_for(pulling, timeout=20)

    asyncio.run(scenario())

    done = store.get_or_raise(task.taskId)
    assert done.status == TaskStatus.COMPLETED
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.created_at <= done.started_at <= done.finished_at
