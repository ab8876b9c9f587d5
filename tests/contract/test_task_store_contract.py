"""The TaskStore contract: what every backend guarantees, run against each of them.

Every test is parametrized by ``backend`` (conftest.py): SQLite on a temporary file and
Firestore on the official emulator. Times that matter (availability, lease expiry) are
passed as explicit ``now`` values, never waited for.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ComfySwapError, Conflict, JobFailed, NotFound, TransientError
from shared.store.base import TaskStore
from shared.tasks import Progress, Task, TaskStatus, utcnow
from tests.contract.conftest import StoreFactory

LEASE_S = 60.0


def make_task(**overrides: Any) -> Task:
    fields: dict[str, Any] = {"workflow": "face_swap", "environment": "face_swap", "owner": "key-a"}
    fields.update(overrides)
    return Task(**fields)


def claim(store: TaskStore, worker_id: str = "runner-1", **kwargs: Any) -> Task | None:
    kwargs.setdefault("environments", ["face_swap"])
    kwargs.setdefault("lease_seconds", LEASE_S)
    return store.claim_next(worker_id=worker_id, **kwargs)


def claimed(store: TaskStore, worker_id: str = "runner-1", **kwargs: Any) -> Task:
    task = claim(store, worker_id, **kwargs)
    assert task is not None
    return task


# --- create / get / list ----------------------------------------------------------------
def test_created_task_reads_back_equal(store: TaskStore) -> None:
    task = make_task(
        params={"input_data": {"source_url": "https://example.com/a.jpg", "matrix": [[1, 2], [3, 4]]}},
        priority=7,
        webhook_url="https://example.com/hook",
        custom_field={"kept": True},
    )

    store.create(task)
    stored = store.get(task.taskId)

    assert stored == task
    assert stored.created_at.tzinfo is not None
    assert stored.to_document() == task.to_document()


def test_get_of_unknown_task_is_none_and_get_or_raise_is_not_found(store: TaskStore) -> None:
    assert store.get("task_missing") is None
    with pytest.raises(NotFound) as raised:
        store.get_or_raise("task_missing")
    assert raised.value.code == "task_not_found"


def test_update_of_unknown_task_is_not_found(store: TaskStore) -> None:
    with pytest.raises(NotFound):
        store.update("task_missing", lambda task: task)


def test_creating_the_same_task_id_twice_conflicts(store: TaskStore) -> None:
    task = store.create(make_task())

    with pytest.raises(Conflict) as raised:
        store.create(make_task(taskId=task.taskId))

    assert raised.value.code == "task_exists"


def test_idempotency_key_is_unique_per_owner(store: TaskStore) -> None:
    first = store.create(make_task(owner="key-a", idempotency_key="order-1"))

    with pytest.raises(Conflict) as raised:
        store.create(make_task(owner="key-a", idempotency_key="order-1"))
    other_owner = store.create(make_task(owner="key-b", idempotency_key="order-1"))

    assert raised.value.code == "idempotency_key_reused"
    assert raised.value.details["task_id"] == first.taskId
    assert store.find_by_idempotency_key("key-a", "order-1") == first
    assert store.find_by_idempotency_key("key-b", "order-1") == other_owner
    assert store.find_by_idempotency_key("key-a", "order-2") is None
    assert len(store.list_tasks(owner="key-a")) == 1


def test_list_tasks_is_newest_first_and_filters_by_owner_and_status(store: TaskStore) -> None:
    base = utcnow()
    tasks = [
        store.create(make_task(owner=owner, created_at=base + dt.timedelta(seconds=index)))
        for index, owner in enumerate(["key-a", "key-b", "key-a", "key-a"])
    ]
    store.cancel(tasks[2].taskId)

    newest_first = [task.taskId for task in reversed(tasks)]
    assert [task.taskId for task in store.list_tasks()] == newest_first
    assert [task.taskId for task in store.list_tasks(limit=2)] == newest_first[:2]
    assert [task.taskId for task in store.list_tasks(owner="key-a")] == [
        tasks[3].taskId,
        tasks[2].taskId,
        tasks[0].taskId,
    ]
    assert [task.taskId for task in store.list_tasks(owner="key-a", statuses=[TaskStatus.PENDING])] == [
        tasks[3].taskId,
        tasks[0].taskId,
    ]
    cancelled_or_failed = store.list_tasks(statuses=[TaskStatus.CANCELLED, TaskStatus.FAILED])
    assert [task.taskId for task in cancelled_or_failed] == [tasks[2].taskId]


# --- claim ------------------------------------------------------------------------------
def test_claim_takes_highest_priority_then_oldest(store: TaskStore) -> None:
    base = utcnow() - dt.timedelta(minutes=5)

    def add(priority: int, age_rank: int) -> Task:
        at = base + dt.timedelta(seconds=age_rank)
        return store.create(make_task(priority=priority, created_at=at, available_at=at))

    low_old = add(1, 0)
    high_new = add(9, 3)
    high_old = add(9, 1)
    mid = add(5, 2)

    order = [claimed(store).taskId for _ in range(4)]

    assert order == [high_old.taskId, high_new.taskId, mid.taskId, low_old.taskId]
    assert claim(store) is None


def test_tenants_take_turns_whatever_their_priorities(store: TaskStore) -> None:
    base = utcnow() - dt.timedelta(minutes=5)
    burst = [
        store.create(make_task(owner="tenant-a", priority=10, created_at=at, available_at=at))
        for at in (base + dt.timedelta(seconds=index) for index in range(12))
    ]
    late = base + dt.timedelta(minutes=1)
    single = store.create(make_task(owner="tenant-b", priority=0, created_at=late, available_at=late))

    first = claimed(store)
    second = claimed(store)  # tenant-a has one claimed, tenant-b none: b's turn
    third = claimed(store)

    assert first.taskId == burst[0].taskId
    assert second.taskId == single.taskId
    assert third.taskId == burst[1].taskId


def test_priority_orders_one_tenants_own_tasks(store: TaskStore) -> None:
    low = store.create(make_task(owner="tenant-a", priority=1))
    high = store.create(make_task(owner="tenant-a", priority=9))

    assert [claimed(store).taskId, claimed(store).taskId] == [high.taskId, low.taskId]


def test_a_tenant_at_its_cap_gets_nothing_more_until_a_task_ends(store: TaskStore) -> None:
    first = store.create(make_task(owner="tenant-a"))
    store.create(make_task(owner="tenant-a"))

    assert claimed(store, max_running_per_owner=1).taskId == first.taskId
    assert claim(store, max_running_per_owner=1) is None
    other = store.create(make_task(owner="tenant-b"))
    assert claimed(store, max_running_per_owner=1).taskId == other.taskId


def test_claim_leases_the_task(store: TaskStore) -> None:
    task = store.create(make_task())
    now = utcnow() + dt.timedelta(seconds=5)

    leased = claimed(store, "runner-7", now=now)

    assert leased.taskId == task.taskId
    assert leased.status == TaskStatus.FETCHED
    assert leased.attempts == 1
    assert leased.lease is not None
    assert leased.lease.owner == "runner-7"
    assert leased.lease.expires_at == now + dt.timedelta(seconds=LEASE_S)
    assert leased.timings["queue_wait_s"] >= 5
    assert store.get(task.taskId) == leased


def test_claim_only_serves_the_asked_environments(store: TaskStore) -> None:
    comfy = store.create(make_task(workflow="txt2img", environment="comm"))

    assert claim(store, environments=["face_swap"]) is None
    assert claim(store, environments=[]) is None
    assert claimed(store, environments=["face_swap", "comm"]).taskId == comfy.taskId


def test_task_available_in_the_future_is_not_claimable_until_then(store: TaskStore) -> None:
    later = utcnow() + dt.timedelta(minutes=10)
    task = store.create(make_task(available_at=later))

    assert claim(store) is None
    assert claimed(store, now=later).taskId == task.taskId


def test_claim_skips_a_full_page_of_higher_priority_tasks_in_backoff(store: TaskStore) -> None:
    later = utcnow() + dt.timedelta(minutes=10)
    for _ in range(12):
        store.create(make_task(priority=9, available_at=later))
    ready = store.create(make_task(priority=1))

    assert claimed(store).taskId == ready.taskId


def test_claim_of_a_named_task_only_from_pending(store: TaskStore) -> None:
    task = store.create(make_task())

    leased = store.claim(task.taskId, worker_id="runner-1", lease_seconds=LEASE_S)
    with pytest.raises(Conflict) as raised:
        store.claim(task.taskId, worker_id="runner-2", lease_seconds=LEASE_S)

    assert leased.status == TaskStatus.FETCHED
    assert raised.value.code == "not_claimable"


def test_eight_concurrent_claimers_get_every_task_exactly_once(store_factory: StoreFactory) -> None:
    seeding = store_factory()
    task_ids = {seeding.create(make_task()).taskId for _ in range(24)}
    claimers = [store_factory() for _ in range(8)]
    claims: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(len(claimers))

    def run(index: int) -> None:
        start.wait(timeout=30)
        try:
            while (task := claim(claimers[index], f"runner-{index}")) is not None:
                with lock:
                    claims.append(task.taskId)
                time.sleep(0.005)  # a runner works between claims; lets the others in
        except BaseException as exc:  # reported below, with every thread joined
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(claimers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not errors
    assert not any(thread.is_alive() for thread in threads)
    assert Counter(claims) == Counter(task_ids)
    owners = {seeding.get_or_raise(task_id).lease.owner for task_id in task_ids}  # type: ignore[union-attr]
    assert len(owners) > 1, "one claimer took everything: the claims did not actually overlap"


# --- the life cycle ---------------------------------------------------------------------
def test_processing_then_complete(store: TaskStore) -> None:
    task = store.create(make_task())
    claimed(store)

    processing = store.start_processing(task.taskId, worker_id="runner-1", timings={"download_s": 1.5})
    progressed = store.set_progress(task.taskId, worker_id="runner-1", progress=Progress(value=3, max=10))
    done = store.complete(
        task.taskId, worker_id="runner-1", output_data={"url": "https://x/y.png"}, timings={"engine_s": 2.0}
    )

    assert processing.status == TaskStatus.PROCESSING
    assert processing.started_at is not None
    assert progressed.progress == Progress(value=3, max=10)
    assert done.status == TaskStatus.COMPLETED
    assert done.output_data == {"url": "https://x/y.png"}
    assert done.timings["download_s"] == 1.5
    assert done.timings["engine_s"] == 2.0
    assert done.lease is None
    assert done.finished_at is not None
    assert store.get(task.taskId) == done


@pytest.mark.parametrize("finish", ["complete", "fail", "cancel"])
def test_terminal_states_never_change(store: TaskStore, finish: str) -> None:
    task = store.create(make_task())
    claimed(store)
    if finish == "complete":
        store.complete(task.taskId, worker_id="runner-1", output_data={"url": "u"})
    elif finish == "fail":
        store.fail_or_retry(task.taskId, worker_id="runner-1", error=JobFailed("no face found"))
    else:
        store.cancel(task.taskId)
    final = store.get_or_raise(task.taskId)

    attempts = [
        lambda: store.complete(task.taskId, worker_id="runner-1", output_data={"url": "other"}),
        lambda: store.fail_or_retry(task.taskId, worker_id="runner-1", error=TransientError("down")),
        lambda: store.start_processing(task.taskId, worker_id="runner-1"),
        lambda: store.release(task.taskId, worker_id="runner-1", reason="shutdown"),
        lambda: store.cancel(task.taskId),
        lambda: store.claim(task.taskId, worker_id="runner-2", lease_seconds=LEASE_S),
        lambda: store.heartbeat(task.taskId, worker_id="runner-1", lease_seconds=LEASE_S),
        *[lambda to=to: store.transition(task.taskId, to) for to in TaskStatus],
    ]
    for attempt in attempts:
        with pytest.raises(Conflict):
            attempt()

    assert store.get(task.taskId) == final
    assert store.reap_expired_leases(now=utcnow() + dt.timedelta(days=1)) == []
    assert claim(store, now=utcnow() + dt.timedelta(days=1)) is None


def test_a_runner_that_lost_its_lease_cannot_touch_the_task(store: TaskStore) -> None:
    task = store.create(make_task(max_attempts=3))
    first = claimed(store, "runner-old")
    assert first.lease is not None
    after_expiry = first.lease.expires_at + dt.timedelta(seconds=1)
    store.reap_expired_leases(now=after_expiry)
    claimed(store, "runner-new", now=after_expiry)

    for stale_call in [
        lambda: store.start_processing(task.taskId, worker_id="runner-old"),
        lambda: store.heartbeat(task.taskId, worker_id="runner-old", lease_seconds=LEASE_S),
        lambda: store.set_progress(task.taskId, worker_id="runner-old", progress=Progress()),
        lambda: store.complete(task.taskId, worker_id="runner-old", output_data={"url": "stale"}),
        lambda: store.fail_or_retry(task.taskId, worker_id="runner-old", error=JobFailed("x")),
        lambda: store.release(task.taskId, worker_id="runner-old", reason="shutdown"),
    ]:
        with pytest.raises(Conflict) as raised:
            stale_call()
        assert raised.value.code == "lease_lost"

    done = store.complete(task.taskId, worker_id="runner-new", output_data={"url": "fresh"})
    assert done.output_data == {"url": "fresh"}


def test_heartbeat_extends_the_lease(store: TaskStore) -> None:
    task = store.create(make_task())
    leased = claimed(store, lease_seconds=5)
    assert leased.lease is not None

    renewed = store.heartbeat(task.taskId, worker_id="runner-1", lease_seconds=600)

    assert renewed.lease is not None
    assert renewed.lease.owner == "runner-1"
    assert renewed.lease.expires_at > leased.lease.expires_at + dt.timedelta(seconds=500)
    assert store.expired_lease_ids(leased.lease.expires_at + dt.timedelta(seconds=1)) == []


def test_retryable_failure_with_attempts_left_goes_back_to_pending_after_a_delay(store: TaskStore) -> None:
    task = store.create(make_task(max_attempts=3))
    claimed(store)
    before = utcnow()

    retried = store.fail_or_retry(
        task.taskId,
        worker_id="runner-1",
        error=TransientError("ComfyUI unreachable", code="comfyui_down"),
        timings={"engine_s": 1.0},
        retry_delay_s=30,
    )

    assert retried.status == TaskStatus.PENDING
    assert retried.lease is None
    assert retried.error is not None
    assert retried.error.code == "comfyui_down"
    assert retried.available_at >= before + dt.timedelta(seconds=30)
    assert [entry["code"] for entry in retried.attempt_history] == ["comfyui_down"]
    assert retried.attempt_history[0]["runner"] == "runner-1"
    assert claim(store) is None, "claimable before its backoff ended"
    again = claimed(store, "runner-2", now=retried.available_at)
    assert again.attempts == 2
    assert again.error is None


def test_retryable_failure_on_the_last_attempt_fails_for_good(store: TaskStore) -> None:
    task = store.create(make_task(max_attempts=1))
    claimed(store)

    failed = store.fail_or_retry(
        task.taskId, worker_id="runner-1", error=TransientError("down", code="gcs_down")
    )

    assert failed.status == TaskStatus.FAILED
    assert failed.error is not None
    assert failed.error.code == "gcs_down"
    assert failed.error.retryable is False
    assert "gave up after 1 attempts" in failed.error.message
    assert len(failed.attempt_history) == 1


def test_permanent_failure_fails_at_once_and_keeps_history(store: TaskStore) -> None:
    task = store.create(make_task(max_attempts=5))
    claimed(store)
    store.fail_or_retry(task.taskId, worker_id="runner-1", error=TransientError("blip"))
    claimed(store, "runner-2", now=utcnow() + dt.timedelta(seconds=1))

    failed = store.fail_or_retry(
        task.taskId, worker_id="runner-2", error=JobFailed("no face in the source image", code="no_face")
    )

    assert failed.status == TaskStatus.FAILED
    assert failed.error is not None
    assert failed.error.code == "no_face"
    assert [entry["runner"] for entry in failed.attempt_history] == ["runner-1", "runner-2"]
    assert failed.finished_at is not None


def test_release_requeues_without_spending_an_attempt(store: TaskStore) -> None:
    task = store.create(make_task())
    claimed(store)

    released = store.release(task.taskId, worker_id="runner-1", reason="shutdown")

    assert released.status == TaskStatus.PENDING
    assert released.attempts == 0
    assert released.lease is None
    assert released.attempt_history[-1]["released"] == "shutdown"
    assert claimed(store, "runner-2").attempts == 1


def test_cancel_pending_and_leased_tasks(store: TaskStore) -> None:
    pending = store.create(make_task())
    leased = store.create(make_task())
    claimed(store)

    cancelled_pending = store.cancel(pending.taskId)
    cancelled_leased = store.cancel(leased.taskId)

    assert cancelled_pending.status == TaskStatus.CANCELLED
    assert cancelled_leased.status == TaskStatus.CANCELLED
    assert cancelled_leased.lease is None
    assert cancelled_leased.error is not None
    assert cancelled_leased.error.code == "cancelled"
    with pytest.raises(Conflict) as raised:
        store.cancel(pending.taskId)
    assert raised.value.code == "already_finished"
    with pytest.raises(Conflict):
        store.complete(leased.taskId, worker_id="runner-1", output_data={"url": "late"})


def test_reaper_requeues_expired_leases_then_fails_after_max_attempts(store: TaskStore) -> None:
    task = store.create(make_task(max_attempts=2))
    untouched = store.create(make_task(environment="comm"))
    now = utcnow()

    first = claimed(store, "runner-1", now=now)
    assert first.lease is not None
    assert store.reap_expired_leases(now=first.lease.expires_at) == [], "a lease is valid until it expires"
    now = first.lease.expires_at + dt.timedelta(seconds=1)
    assert store.expired_lease_ids(now) == [task.taskId]
    requeued = store.reap_expired_leases(now=now)

    second = claimed(store, "runner-2", now=now)
    store.start_processing(task.taskId, worker_id="runner-2")
    assert second.lease is not None
    now = second.lease.expires_at + dt.timedelta(seconds=1)
    final = store.reap_expired_leases(now=now)

    assert [t.status for t in requeued] == [TaskStatus.PENDING]
    assert requeued[0].lease is None
    assert requeued[0].attempt_history[0]["code"] == "lease_expired"
    assert second.attempts == 2
    assert [t.status for t in final] == [TaskStatus.FAILED]
    assert final[0].error is not None
    assert final[0].error.code == "lease_expired"
    assert [entry["runner"] for entry in final[0].attempt_history] == ["runner-1", "runner-2"]
    assert store.get_or_raise(untouched.taskId).status == TaskStatus.PENDING
    assert store.reap_expired_leases(now=now + dt.timedelta(hours=1)) == []


# --- queue statistics and waiting -------------------------------------------------------
def test_queue_stats_counts_by_status_and_owner(store: TaskStore) -> None:
    assert store.queue_stats().pending == 0
    assert store.queue_stats().oldest_pending_age_s is None
    old = utcnow() - dt.timedelta(minutes=2)
    store.create(make_task(owner="key-a", created_at=old, available_at=old))
    for _ in range(2):
        store.create(make_task(owner="key-a"))
    store.create(make_task(owner="key-b"))
    store.create(make_task(owner="key-b", environment="comm"))
    # Tenants take turns: key-a's oldest, key-b's face swap, then key-a's other two.
    leased = claimed(store)
    processing = claimed(store)
    store.start_processing(processing.taskId, worker_id="runner-1")
    done = claimed(store)
    store.complete(done.taskId, worker_id="runner-1", output_data={"url": "u"})
    cancelled = claimed(store)
    store.cancel(cancelled.taskId)

    stats = store.queue_stats()
    per_owner = store.queue_stats(owner="key-b")

    assert leased.owner == "key-a"
    assert (
        stats.pending,
        stats.fetched,
        stats.processing,
        stats.completed,
        stats.cancelled,
        stats.failed,
    ) == (
        1,
        1,
        1,
        1,
        1,
        0,
    )
    assert stats.queue_length == 1
    assert stats.oldest_pending_age_s is not None
    assert 0 <= stats.oldest_pending_age_s < 60
    assert (per_owner.pending, per_owner.processing, per_owner.fetched, per_owner.cancelled) == (1, 1, 0, 0)


def test_queue_stats_reports_the_age_of_the_oldest_pending_task(store: TaskStore) -> None:
    old = utcnow() - dt.timedelta(minutes=3)
    store.create(make_task(created_at=old, available_at=old))
    store.create(make_task())

    stats = store.queue_stats()

    assert stats.oldest_pending_age_s is not None
    assert 180 <= stats.oldest_pending_age_s < 240


def test_wait_for_work_wakes_on_a_task_created_by_another_instance(store_factory: StoreFactory) -> None:
    waiter = store_factory()
    creator = store_factory()
    assert waiter.wait_for_work(0.2) is False
    timer = threading.Timer(0.3, lambda: creator.create(make_task()))
    timer.start()
    try:
        woke = waiter.wait_for_work(10.0)
    finally:
        timer.join()

    assert woke is True


def test_a_task_watch_wakes_on_a_change_by_another_instance(store_factory: StoreFactory) -> None:
    watcher = store_factory()
    writer = store_factory()
    task = writer.create(make_task())

    with watcher.watch_task(task.taskId) as watch:
        watch.wait(0.0)  # a backend may first deliver the state as it was when watching began
        writer.cancel(task.taskId)
        deadline = time.monotonic() + 30.0
        while (watch.last is None or watch.last.status != "CANCELLED") and time.monotonic() < deadline:
            watch.wait(deadline - time.monotonic())

    assert watch.last is not None
    assert (watch.last.task_id, watch.last.status) == (task.taskId, "CANCELLED")


def test_progress_with_a_lease_renews_the_lease_in_the_same_write(store: TaskStore) -> None:
    task = store.create(make_task())
    leased = claimed(store)
    assert leased.lease is not None

    progress = Progress(value=1, max=4, stage="frames")

    updated = store.set_progress(task.taskId, worker_id="runner-1", progress=progress, lease_seconds=600)

    assert updated.progress == progress
    assert updated.lease is not None and updated.lease.expires_at > leased.lease.expires_at
    assert store.get_or_raise(task.taskId).lease == updated.lease


def test_errors_keep_their_details_in_the_task(store: TaskStore) -> None:
    task = store.create(make_task())
    claimed(store)
    error = ComfySwapError("engine crashed", code="engine_crash", details={"exit_code": 139})

    failed = store.fail_or_retry(task.taskId, worker_id="runner-1", error=error)

    assert failed.error is not None
    assert failed.error.details == {"exit_code": 139}
    assert store.get_or_raise(task.taskId).error == failed.error


# --- SQLite across processes ------------------------------------------------------------
@pytest.mark.slow
def test_eight_processes_claim_every_task_of_one_sqlite_file_exactly_once(tmp_path: Path) -> None:
    """The embedded store is shared by separate processes (API, runner, CLI): its claim
    must be atomic across processes, not just threads."""
    import multiprocessing

    from shared.store.sqlite import SQLiteTaskStore
    from tests.contract.sqlite_claim_worker import claim_until_empty

    path = tmp_path / "tasks.sqlite3"
    seeding = SQLiteTaskStore(path)
    task_ids = [seeding.create(make_task()).taskId for _ in range(80)]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(8)
    results = context.Queue()
    processes = [
        context.Process(target=claim_until_empty, args=(str(path), f"process-{index}", start, results))
        for index in range(8)
    ]
    for process in processes:
        process.start()
    try:
        reports = [results.get(timeout=120) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    results.close()
    results.join_thread()

    assert [error for _, _, error in reports if error] == []
    claims = [task_id for _, ids, _ in reports for task_id in ids]
    assert Counter(claims) == Counter(task_ids)
    assert sum(1 for _, ids, _ in reports if ids) > 1, "one process took everything: no overlap"
    assert all(seeding.get_or_raise(task_id).status == TaskStatus.FETCHED for task_id in task_ids)
    seeding.close()


def test_pending_ids_available_before_lists_longest_waiting_first(store: TaskStore) -> None:
    now = utcnow()
    newer = store.create(make_task(available_at=now - dt.timedelta(minutes=2)))
    oldest = store.create(make_task(available_at=now - dt.timedelta(minutes=9)))
    store.create(make_task(available_at=now))
    store.create(make_task(available_at=now + dt.timedelta(minutes=5)))
    leased_old = store.create(make_task(environment="comm", available_at=now - dt.timedelta(minutes=30)))
    claimed(store, environments=["comm"])

    stale = store.pending_ids_available_before(now - dt.timedelta(minutes=1))

    assert leased_old.taskId not in stale
    assert stale == [oldest.taskId, newer.taskId]
    assert store.pending_ids_available_before(now - dt.timedelta(minutes=1), limit=1) == [oldest.taskId]


def test_concurrent_updates_of_one_task_are_never_lost(store_factory: StoreFactory) -> None:
    """update() is a compare-and-set: concurrent read-modify-writes are serialised.

    Kept small: the Firestore emulator resolves each collision by a 2 s lock timeout
    (production Firestore aborts the younger transaction at once)."""
    task = store_factory().create(make_task())
    writers = [store_factory() for _ in range(3)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(writers))

    def bump(updated: Task) -> Task:
        changed = updated.model_copy(deep=True)
        changed.timings["bumps"] = changed.timings.get("bumps", 0) + 1
        return changed

    def run(writer: TaskStore) -> None:
        start.wait(timeout=30)
        try:
            for _ in range(2):
                writer.update(task.taskId, bump)
        except BaseException as exc:  # reported below, with every thread joined
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(writer,)) for writer in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not errors
    assert store_factory().get_or_raise(task.taskId).timings["bumps"] == 6


def test_duplicate_push_deliveries_claim_a_task_once(store_factory: StoreFactory) -> None:
    """Cloud Tasks delivers at least once: of simultaneous deliveries one claim wins."""
    task = store_factory().create(make_task())
    runners = [store_factory() for _ in range(4)]
    outcomes: list[str] = []
    start = threading.Barrier(len(runners))

    def deliver(index: int) -> None:
        start.wait(timeout=30)
        try:
            runners[index].claim(task.taskId, worker_id=f"runner-{index}", lease_seconds=LEASE_S)
            outcomes.append("claimed")
        except Conflict as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=deliver, args=(index,)) for index in range(len(runners))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert sorted(outcomes) == ["claimed"] + ["not_claimable"] * 3
    assert store_factory().get_or_raise(task.taskId).attempts == 1


def test_finished_since_lists_only_tasks_that_ended_in_the_window(store: TaskStore) -> None:
    before = utcnow() - dt.timedelta(seconds=1)
    done = store.create(make_task())
    failed = store.create(make_task())
    cancelled = store.create(make_task())
    running = store.create(make_task())
    still_pending = store.create(make_task())
    for _ in range(4):  # oldest first: every task but the last is leased
        claimed(store)
    store.complete(done.taskId, worker_id="runner-1", output_data={"url": "https://x/y.png"})
    store.fail_or_retry(failed.taskId, worker_id="runner-1", error=JobFailed("no face", code="no_face"))
    store.cancel(cancelled.taskId)

    window = store.finished_since(before)
    later = store.finished_since(utcnow() + dt.timedelta(seconds=5))

    assert {task.taskId: task.status for task in window} == {
        done.taskId: TaskStatus.COMPLETED,
        failed.taskId: TaskStatus.FAILED,
        cancelled.taskId: TaskStatus.CANCELLED,
    }
    assert still_pending.taskId not in {task.taskId for task in window}
    assert running.taskId not in {task.taskId for task in window}
    assert later == []


# --- retention: finished tasks expire, any task can be deleted ---------------------------
def test_finished_tasks_expire_after_the_retention_and_running_ones_never(store: TaskStore) -> None:
    running = store.create(make_task(owner="key-a"))
    claimed(store)
    done = store.create(make_task(owner="key-b", idempotency_key="k-1"))
    claimed(store)
    finished = store.complete(done.taskId, worker_id="runner-1", output_data={"url": "u"})
    cancelled = store.cancel(store.create(make_task(owner="key-c")).taskId)
    assert finished.finished_at is not None and cancelled.finished_at is not None
    assert store.expire_at(finished) == finished.finished_at + store.retention

    just_before = finished.finished_at + store.retention - dt.timedelta(seconds=1)
    assert done.taskId not in store.expired_task_ids(just_before)
    later = utcnow() + store.retention + dt.timedelta(days=1)
    assert sorted(store.expired_task_ids(later)) == sorted([done.taskId, cancelled.taskId])
    assert running.taskId not in store.expired_task_ids(later)
    # The stored field never leaks into the task the store hands back.
    assert store.get(done.taskId) == finished


def test_delete_removes_the_task_and_frees_its_idempotency_key(store: TaskStore) -> None:
    task = store.create(make_task(idempotency_key="k-del"))

    assert store.delete(task.taskId) is True
    assert store.get(task.taskId) is None
    assert store.find_by_idempotency_key("key-a", "k-del") is None
    assert store.delete(task.taskId) is False
    store.create(make_task(idempotency_key="k-del"))  # the key is free again
