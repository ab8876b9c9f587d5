"""Firestore-specific behaviour beyond the shared contract (tests/contract): settings,
the stored document's shape, and the index list Terraform is checked against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.cloud import firestore

from shared.settings import Settings
from shared.store import make_task_store
from shared.store.firestore import REQUIRED_INDEXES, FirestoreTaskStore, indexes_as_json
from shared.tasks import Task
from tests.cloud_fixtures import FirestoreEmulator, firestore_emulator

__all__ = ["firestore_emulator"]

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def emulator(firestore_emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch) -> FirestoreEmulator:
    firestore_emulator.reset()
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    return firestore_emulator


def test_infra_index_file_matches_the_module() -> None:
    stored = json.loads((REPO_ROOT / "infra" / "firestore_indexes.json").read_text())

    assert stored == indexes_as_json()
    assert len(stored["indexes"]) == len(REQUIRED_INDEXES)


@pytest.mark.emulator
def test_the_store_is_built_from_settings(emulator: FirestoreEmulator) -> None:
    settings = Settings(
        task_store="firestore", google_cloud_project=emulator.project, firestore_collection="jobs"
    )
    store = make_task_store(settings)
    try:
        task = store.create(Task(workflow="face_swap", environment="face_swap"))

        raw = firestore.Client(project=emulator.project).collection("jobs").document(task.taskId).get()
        assert isinstance(store, FirestoreTaskStore)
        assert raw.exists
        assert store.get(task.taskId) == task
    finally:
        store.close()


@pytest.mark.emulator
def test_query_fields_are_native_timestamps_and_nested_arrays_are_kept(emulator: FirestoreEmulator) -> None:
    """Firestore refuses an array inside an array (ComfyUI widgets can hold one)."""
    client = firestore.Client(project=emulator.project)
    store = FirestoreTaskStore(client)
    task = Task(
        workflow="txt2img", environment="comm", params={"input_data": {"wf_json": {"grid": [[1, 2], [3]]}}}
    )

    store.create(task)
    claimed = store.claim_next(worker_id="runner-1", environments=["comm"], lease_seconds=60)
    raw = client.collection("tasks").document(task.taskId).get().to_dict() or {}

    assert claimed is not None
    assert claimed.lease is not None
    assert raw["created_at"] == task.created_at
    assert raw["lease_expires_at"] == claimed.lease.expires_at
    assert raw["status"] == "FETCHED"
    assert "params" not in raw
    assert json.loads(raw["params__json"])["input_data"]["wf_json"]["grid"] == [[1, 2], [3]]
    assert store.get(task.taskId) == claimed
    store.close()


@pytest.mark.emulator
def test_wait_for_work_does_not_spin_on_unchanged_work(emulator: FirestoreEmulator) -> None:
    """A runner of another environment must not be woken again and again by a task it
    cannot claim: only a change in the queue wakes it."""
    store = FirestoreTaskStore(firestore.Client(project=emulator.project))
    store.create(Task(workflow="txt2img", environment="comm"))

    assert store.wait_for_work(0.4, ["face_swap"]) is False
    store.close()


@pytest.mark.emulator
def test_a_new_task_wakes_one_of_the_fetches_waiting_in_one_instance(
    emulator: FirestoreEmulator, tmp_path: Path
) -> None:
    """Issue 14: eight runners' fetch_task long polls wait in one instance; a new task used
    to wake all eight, and seven lost the race for it (counted at the gRPC channel). Now
    the head listener's change wakes one of them; a burst still reaches every waiter."""
    import time

    from benchmarks.scale import counting_stores
    from shared.dispatch.base import NoopDispatcher
    from shared.service import TaskService
    from tests.waiting_fetches import start_waiting_fetches

    with counting_stores(emulator.project, "tasks", 1) as ([store], counter):
        service = TaskService(Settings(data_dir=tmp_path / "data"), store, NoopDispatcher())
        threads, fetched, _ = start_waiting_fetches(service, store, 8)
        creator = FirestoreTaskStore(firestore.Client(project=emulator.project))
        tasks = [creator.create(Task(workflow="face_swap", environment="face_swap"))]
        deadline = time.monotonic() + 60
        while len(fetched) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # An observation window, not a wait for something to finish: a fetch woken with
        # the first one would write its compare-and-set within a few hundred ms.
        time.sleep(1.0)
        lost_for_the_first = counter["conflicts"] + counter["aborted"]
        tasks += [creator.create(Task(workflow="face_swap", environment="face_swap")) for _ in range(7)]
        for thread in threads:
            thread.join(timeout=90)
        creator.close()

    assert lost_for_the_first == 0
    assert sorted(task.taskId for task in fetched.values() if task) == sorted(task.taskId for task in tasks)


@pytest.mark.emulator
def test_duplicate_deliveries_of_a_task_claim_it_once_without_locking(emulator: FirestoreEmulator) -> None:
    """A push claim was a transaction: eight deliveries of one task at once queued on its
    lock, the emulator broke the queue with lock timeouts (aborted commits, 2.5 s; once
    239 aborted commits in 60 s and seven store_contention errors instead of refusals).
    It is a compare-and-set now: one write wins, the others fail at once and are refused."""
    import threading

    from benchmarks.scale import counting_stores
    from shared.errors import Conflict

    seeding = FirestoreTaskStore(firestore.Client(project=emulator.project))
    task = seeding.create(Task(workflow="face_swap", environment="face_swap"))
    seeding.close()
    outcomes: list[str] = []
    with counting_stores(emulator.project, "tasks", 8) as (runners, counter):
        start = threading.Barrier(len(runners))

        def deliver(index: int) -> None:
            start.wait(timeout=30)
            try:
                runners[index].claim(task.taskId, worker_id=f"runner-{index}", lease_seconds=60)
                outcomes.append("claimed")
            except Conflict as exc:
                outcomes.append(exc.code)
            except Exception as exc:  # reported by the assertion below
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=deliver, args=(index,)) for index in range(len(runners))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        aborted = counter["aborted"]

    assert sorted(outcomes) == ["claimed"] + ["not_claimable"] * 7
    assert aborted == 0


@pytest.mark.emulator
def test_a_burst_that_arrives_during_the_waiters_claims_reaches_every_waiter_of_a_fleet(
    emulator: FirestoreEmulator, tmp_path: Path
) -> None:
    """Two runners' fetches in one instance, both in the middle of a claim (which read the
    queue empty) when a burst of tasks arrives: the head listener delivers ONE change
    (the head), and the line wakes the first of them. Its claim in flight finds nothing;
    its next claim, as one of a fleet (another runner announced itself), takes a random
    task of the burst, not the head, so no new head and no new change follow. Unless that
    taker wakes the other waiter, the other sleeps to its deadline (25 s) while the rest
    of the burst is PENDING. (Without the fix it still passes now and then: when the
    taker's random pick is the head, the head moves and the listener wakes the other.)"""
    import datetime as dt
    import hashlib
    import threading
    import time

    from shared.dispatch.base import NoopDispatcher
    from shared.service import MAX_FETCH_WAIT_S, TaskService
    from shared.tasks import utcnow

    client = firestore.Client(project=emulator.project)
    now = utcnow()
    client.collection("tasks_fleet").document("face_swap").collection("tasks_claimers").document(
        hashlib.sha256(b"runner-elsewhere").hexdigest()
    ).set({"worker_id": "runner-elsewhere", "seen_at": now, "expire_at": now + dt.timedelta(seconds=90)})
    store = FirestoreTaskStore(client)
    service = TaskService(Settings(data_dir=tmp_path / "data"), store, NoopDispatcher())
    in_flight: list[str] = []
    release = threading.Event()
    real_claim_next = store.claim_next

    def claim_next_held_once(**kwargs: Any) -> Task | None:
        task = real_claim_next(**kwargs)
        if len(in_flight) < 2:  # each fetch's first claim: its answer comes after the burst
            in_flight.append(kwargs["worker_id"])
            release.wait(60)
        return task

    store.claim_next = claim_next_held_once  # type: ignore[method-assign]  # the real claim, held
    results: dict[str, tuple[Task | None, float]] = {}

    def fetch(worker_id: str) -> None:
        task = service.fetch_for_runner(
            worker_id=worker_id, environments=["face_swap"], wait_s=MAX_FETCH_WAIT_S
        )
        results[worker_id] = (task, time.monotonic())

    threads = [threading.Thread(target=fetch, args=(f"runner-{index}",)) for index in range(2)]
    deadline = time.monotonic() + 60
    for started, thread in enumerate(threads, start=1):
        thread.start()  # runner-0 joins the line first, then runner-1
        while len(in_flight) < started and time.monotonic() < deadline:
            time.sleep(0.01)
    assert in_flight == ["runner-0", "runner-1"]
    creator = FirestoreTaskStore(firestore.Client(project=emulator.project))
    burst = [creator.create(Task(workflow="face_swap", environment="face_swap")) for _ in range(30)]
    line = store.__dict__["_work_lines"][frozenset({"face_swap"})]
    while not any(watch.woken for watch in line._waiters) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(watch.woken for watch in line._waiters), "the burst's change reached the line"
    released_at = time.monotonic()
    release.set()
    for thread in threads:
        thread.join(timeout=90)
    creator.close()
    store.close()

    taken = {task.taskId for task, _ in results.values() if task}
    assert len(taken) == 2 and taken <= {task.taskId for task in burst}
    slowest = max(at for _, at in results.values()) - released_at
    assert slowest < 10.0, f"a waiter slept {slowest:.1f} s with the rest of the burst PENDING"


class _Candidate:
    """What spread_claims reads of a query snapshot: ``get(field)``."""

    def __init__(self, name: str, priority: int, owner: str = "tenant-a") -> None:
        self.name = name
        self.fields = {"priority": priority, "owner": owner}

    def get(self, field: str) -> object:
        return self.fields[field]


def test_claimers_start_at_different_tasks_of_the_best_priority_never_a_lower_one() -> None:
    """Runners reading the same page must not all race for its head (issue 14)."""
    import random

    from shared.store.firestore import spread_claims

    page = [_Candidate(f"high-{i}", 9) for i in range(5)] + [_Candidate(f"low-{i}", 1) for i in range(5)]
    rng = random.Random(1)

    orders = [[candidate.name for candidate in spread_claims(page, rng)] for _ in range(64)]

    assert len({order[0] for order in orders}) == 5  # every high-priority task is someone's first
    for order in orders:
        assert sorted(order[:5]) == [f"high-{i}" for i in range(5)]  # no low before any high
        assert order[5:] == [f"low-{i}" for i in range(5)]  # lower priorities keep their order


def test_a_spread_claim_keeps_the_owner_whose_turn_it_is_first() -> None:
    """Candidates come in turn order (fair_pick): spreading must not hand the turn of the
    owner with the fewest running tasks to the next owner's equally urgent task."""
    import random

    from shared.store.firestore import spread_claims

    page = [_Candidate("b-0", 5, "tenant-b"), _Candidate("b-1", 5, "tenant-b"), _Candidate("a-0", 5)]

    firsts = {spread_claims(page, random.Random(seed))[0].name for seed in range(32)}

    assert firsts == {"b-0", "b-1"}


def test_claim_shards_are_stable_and_spread_over_every_shard() -> None:
    from shared.store.firestore import CLAIM_SHARDS, claim_shard
    from shared.tasks import new_task_id

    ids = [new_task_id() for _ in range(CLAIM_SHARDS * 40)]
    shards = [claim_shard(task_id) for task_id in ids]

    assert shards == [claim_shard(task_id) for task_id in ids]
    assert set(shards) == set(range(CLAIM_SHARDS))
    assert max(shards.count(shard) for shard in range(CLAIM_SHARDS)) < 3 * 40


@pytest.mark.emulator
def test_the_document_carries_its_claim_shard_and_reads_back_without_it(emulator: FirestoreEmulator) -> None:
    from shared.store.firestore import claim_shard

    store = FirestoreTaskStore(firestore.Client(project=emulator.project))
    try:
        task = store.create(Task(workflow="face_swap", environment="face_swap"))

        raw = store._tasks.document(task.taskId).get().to_dict() or {}
        assert raw["shard"] == claim_shard(task.taskId)
        assert store.get(task.taskId) == task
    finally:
        store.close()


@pytest.mark.emulator
def test_sixteen_claimers_do_not_all_contend_on_the_oldest_task(emulator: FirestoreEmulator) -> None:
    """Issue 14: claimers must not pile onto the head of the queue. Before, every claim
    first wrote the oldest task, so all but one of the claimers lost each round (about
    two lost races per claim at 16 claimers); a claimer that lost once now reads random
    claim shards. Lost races are counted at the gRPC channel (every failed Commit)."""
    import threading
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.scale import counting_stores

    seeding = FirestoreTaskStore(firestore.Client(project=emulator.project))
    task_ids = {
        seeding.create(Task(workflow="face_swap", environment="face_swap")).taskId for _ in range(160)
    }
    seeding.close()
    with counting_stores(emulator.project, "tasks", 16) as (claimers, counter):
        start = threading.Barrier(len(claimers))

        def claim_until_empty(index: int) -> list[str]:
            start.wait(timeout=30)
            taken: list[str] = []
            while task := claimers[index].claim_next(
                worker_id=f"runner-{index}", environments=["face_swap"], lease_seconds=120
            ):
                taken.append(task.taskId)
            return taken

        with ThreadPoolExecutor(len(claimers)) as pool:
            claims = [
                task_id for taken in pool.map(claim_until_empty, range(len(claimers))) for task_id in taken
            ]
        lost_races = counter["conflicts"] + counter["aborted"]

    assert Counter(claims) == Counter(task_ids)
    # The first claims race for the head (15 lost) and the last tasks are raced by more
    # claimers than remain; in between a claim rarely loses.
    assert lost_races <= 0.6 * len(claims), f"{lost_races} lost races for {len(claims)} claims"


@pytest.mark.emulator
def test_claimers_that_start_together_do_not_race_for_the_head(emulator: FirestoreEmulator) -> None:
    """Issue 14: a fleet that starts together (a deploy, a scale-up) used to send every
    first claim to the head of the queue, as a lone runner's would: all but one lost
    (15 lost races of 16 first claims). Claimers announce themselves before they count
    the others, so each knows it is one of a fleet before its first claim and reads a
    random claim shard; only the first few to count (before the others' announcements
    landed) take the head."""
    import threading
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.scale import counting_stores

    seeding = FirestoreTaskStore(firestore.Client(project=emulator.project))
    for _ in range(160):
        seeding.create(Task(workflow="face_swap", environment="face_swap"))
    seeding.close()
    with counting_stores(emulator.project, "tasks", 16) as (claimers, counter):
        start = threading.Barrier(len(claimers))

        def first_claim(index: int) -> str:
            start.wait(timeout=30)
            task = claimers[index].claim_next(
                worker_id=f"runner-{index}", environments=["face_swap"], lease_seconds=120
            )
            assert task is not None
            return task.taskId

        with ThreadPoolExecutor(len(claimers)) as pool:
            claims = list(pool.map(first_claim, range(len(claimers))))
        lost_races = counter["conflicts"] + counter["aborted"]

    assert len(Counter(claims)) == len(claims) == 16
    assert lost_races <= 4, f"{lost_races} lost races in 16 first claims"


@pytest.mark.emulator
def test_a_lone_claimer_that_announced_itself_keeps_strict_order(emulator: FirestoreEmulator) -> None:
    """Its own announcement is no evidence of a fleet: it claims the oldest task, every time."""
    store = FirestoreTaskStore(firestore.Client(project=emulator.project))
    try:
        _assert_claims_in_strict_order(store, 12)
    finally:
        store.close()


def _assert_claims_in_strict_order(store: FirestoreTaskStore, count: int) -> None:
    """``count`` new tasks come back from claim_next oldest first, and the store never
    went into spread mode (random claim shards)."""
    created = [store.create(Task(workflow="face_swap", environment="face_swap")).taskId for _ in range(count)]
    order = [
        store.claim_next(worker_id="runner-0", environments=["face_swap"], lease_seconds=60)
        for _ in range(count)
    ]
    assert [task.taskId if task else None for task in order] == created
    assert store._spread_until == 0.0


@pytest.mark.emulator
def test_a_dead_runners_announcement_that_ttl_has_not_deleted_yet_does_not_spread_the_survivor(
    emulator: FirestoreEmulator,
) -> None:
    """A crashed runner's announcement stays until the TTL policy deletes it, which takes
    up to a day in Firestore. The count must go by seen_at, or the lone survivor claims
    from random shards (FIFO lost) for that day."""
    import datetime as dt
    import hashlib

    from shared.tasks import utcnow

    stale = utcnow() - dt.timedelta(seconds=120)
    client = firestore.Client(project=emulator.project)
    client.collection("tasks_fleet").document("face_swap").collection("tasks_claimers").document(
        hashlib.sha256(b"runner-dead").hexdigest()
    ).set({"worker_id": "runner-dead", "seen_at": stale, "expire_at": stale + dt.timedelta(seconds=90)})
    store = FirestoreTaskStore(client)
    try:
        _assert_claims_in_strict_order(store, 6)
    finally:
        store.close()


@pytest.mark.emulator
def test_a_claimer_that_sees_another_announced_worker_spreads(emulator: FirestoreEmulator) -> None:
    """A worker that announced itself (claimed within the last _PRESENCE_S) on another
    machine makes a new claimer one of a fleet before it lost any race."""
    first = FirestoreTaskStore(firestore.Client(project=emulator.project))
    second = FirestoreTaskStore(firestore.Client(project=emulator.project))
    try:
        for _ in range(4):
            first.create(Task(workflow="face_swap", environment="face_swap"))
        assert first.claim_next(worker_id="runner-a", environments=["face_swap"], lease_seconds=60)
        assert first._spread_until == 0.0  # alone so far
        assert second.claim_next(worker_id="runner-b", environments=["face_swap"], lease_seconds=60)
        assert second._spread_until > 0.0
        assert second.claim_next(worker_id="runner-b", environments=["comm"], lease_seconds=60) is None
    finally:
        first.close()
        second.close()


@pytest.mark.emulator
def test_a_fair_claim_does_not_read_every_running_task(
    emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, every claim read all FETCHED/PROCESSING tasks of the fleet to count them per
    owner (10,000 reads per claim with 10,000 GPUs busy). Now it counts (an aggregation)
    only the owners among its candidates, and only when there is more than one."""
    from google.cloud.firestore_v1.query import Query

    store = FirestoreTaskStore(firestore.Client(project=emulator.project))
    try:
        for _ in range(60):
            store.create(Task(workflow="face_swap", environment="face_swap", owner="tenant-a"))
        for index in range(50):
            assert store.claim_next(worker_id=f"runner-{index}", environments=["face_swap"], lease_seconds=60)
        other = store.create(Task(workflow="face_swap", environment="face_swap", owner="tenant-b"))
        documents_read = 0
        stream = Query.stream

        def counted(self: Query, *args: Any, **kwargs: Any) -> Any:
            nonlocal documents_read
            for snapshot in stream(self, *args, **kwargs):
                documents_read += 1
                yield snapshot

        monkeypatch.setattr(Query, "stream", counted)
        claimed = store.claim_next(worker_id="runner-x", environments=["face_swap"], lease_seconds=60)

        assert claimed is not None and claimed.taskId == other.taskId  # tenant-b's turn
        assert documents_read <= 25, f"{documents_read} documents read for one claim"
    finally:
        store.close()


@pytest.mark.emulator
def test_a_claimer_of_a_fleet_still_gives_a_waiting_tenant_its_turn(emulator: FirestoreEmulator) -> None:
    """Claim shards must not cost fair share: a claimer that reads one shard (it lost a
    race, so it is one of a fleet) and finds only a tenant with claimed tasks there reads
    the whole queue when another tenant waits, whose turn comes first (TaskStore.claim_next)."""
    import random
    import time

    store = FirestoreTaskStore(firestore.Client(project=emulator.project))
    try:
        for _ in range(40):
            store.create(Task(workflow="face_swap", environment="face_swap", owner="tenant-a", priority=10))
        first = store.claim_next(worker_id="runner-0", environments=["face_swap"], lease_seconds=60)
        assert first is not None and first.owner == "tenant-a"
        waiting = store.create(Task(workflow="face_swap", environment="face_swap", owner="tenant-b"))
        store._spread_until = time.monotonic() + 60  # as after a lost race: claims read claim shards
        store._rng = random.Random(14)
        claimed = store.claim_next(worker_id="runner-1", environments=["face_swap"], lease_seconds=60)

        assert claimed is not None
        assert claimed.taskId == waiting.taskId  # tenant-a has a task claimed, tenant-b none
    finally:
        store.close()
