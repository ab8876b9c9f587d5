"""Firestore-specific behaviour beyond the shared contract (tests/contract): settings,
the stored document's shape, and the index list Terraform is checked against."""

from __future__ import annotations

import json
from pathlib import Path

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


class _Candidate:
    """What spread_claims reads of a query snapshot: ``get(field)``."""

    def __init__(self, name: str, priority: int) -> None:
        self.name = name
        self.priority = priority

    def get(self, field: str) -> int:
        assert field == "priority"
        return self.priority


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
