"""DELETE /api/tasks/{id} and the retention sweep (issue 13, build 3) on the embedded path:
the dev server, a real runner, SQLite and the local result and input stores.

Deleting a finished task removes its result files and its document; deleting one that has
not run yet cancels it and removes its stored ``data:`` input; another tenant's id is a 404
that changes nothing. Past TASK_RETENTION_DAYS, the runner's sweep deletes a finished task
with its results.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from shared.auth import hash_api_key
from shared.settings import Settings
from shared.storage import make_storage_chain
from shared.storage.orphans import sweep_expired_tasks
from shared.store.sqlite import SQLiteTaskStore
from tests.faults.stack import FaultStack, MediaServer, face_swap_body
from tests.large_photo import data_url

pytestmark = [pytest.mark.e2e]

ALICE, BOB = "csk_alice_delete_key", "csk_bob_delete_key"
KEYS = {"API_KEYS": f"{hash_api_key(ALICE)}:alice:client,{hash_api_key(BOB)}:bob:client"}


def _stored_inputs(stack: FaultStack, task_id: str) -> list[str]:
    folder = stack.data_dir / "inputs" / task_id
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def test_deleting_a_finished_task_removes_its_results_and_document(make_stack, media_server: MediaServer):
    stack = make_stack()
    task_id = stack.create(face_swap_body(media_server))
    assert stack.wait_terminal(task_id, timeout_s=180)["status"] == "COMPLETED"
    assert stack.result_files(task_id)

    response = stack.client.delete(f"/api/tasks/{task_id}")

    assert response.status_code == 200, response.text
    assert response.json()["deleted"] == task_id
    assert response.json()["objects_removed"] >= 1
    assert stack.result_files(task_id) == []
    assert stack.client.get(f"/api/tasks/{task_id}").status_code == 404
    assert stack.client.delete(f"/api/tasks/{task_id}").status_code == 404


def test_deleting_a_pending_task_cancels_it_and_removes_its_inputs(make_stack):
    stack = make_stack(KEYS, runner=False)
    alice, bob = {"X-API-Key": ALICE}, {"X-API-Key": BOB}
    body = {
        "workflow": "face_swap",
        "environment": "face_swap",
        "task_data": {
            "source_url": data_url(b"\xff\xd8\xff\xe0 not really a photo", "image/jpeg"),
            "target_url": "https://example.com/target.png",
        },
    }
    task_id = stack.create(body, headers=alice)
    assert _stored_inputs(stack, task_id) == ["source_url"]

    as_bob = stack.client.delete(f"/api/tasks/{task_id}", headers=bob)
    assert as_bob.status_code == 404, as_bob.text
    assert _stored_inputs(stack, task_id) == ["source_url"]
    assert stack.client.get(f"/api/tasks/{task_id}", headers=alice).json()["status"] == "PENDING"

    response = stack.client.delete(f"/api/tasks/{task_id}", headers=alice)

    assert response.status_code == 200, response.text
    assert _stored_inputs(stack, task_id) == []
    assert stack.client.get(f"/api/tasks/{task_id}", headers=alice).status_code == 404
    assert stack.api_events("task_finished", task_id=task_id)[0]["outcome"] == "CANCELLED"


def test_the_retention_sweep_deletes_expired_tasks_with_their_results(make_stack, media_server: MediaServer):
    stack = make_stack()
    task_id = stack.create(face_swap_body(media_server))
    assert stack.wait_terminal(task_id, timeout_s=180)["status"] == "COMPLETED"
    assert stack.result_files(task_id)
    settings = stack_settings(stack.data_dir)
    store = SQLiteTaskStore(settings.sqlite_path)
    try:
        storage = make_storage_chain(settings)
        assert sweep_expired_tasks(storage, store, now=dt.datetime.now(dt.UTC)) == 0
        later = dt.datetime.now(dt.UTC) + store.retention + dt.timedelta(hours=1)

        assert sweep_expired_tasks(storage, store, now=later) == 1
    finally:
        store.close()

    assert stack.result_files(task_id) == []
    assert stack.client.get(f"/api/tasks/{task_id}").status_code == 404


def stack_settings(data_dir: Path) -> Settings:
    """The settings the stack's processes run with, as far as the store and storage go."""
    return Settings(data_dir=data_dir)
