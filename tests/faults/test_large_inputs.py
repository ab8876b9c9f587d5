"""Inputs of any size up to FETCH_MAX_BYTES, kept out of the task document (issue 19 #1,
issue 13 #6) on the embedded path (SQLite, local input store); the cloud path's twin is
in tests/e2e/test_cloud_path.py.

A 5 MB phone photo sent as a ``data:`` URL completes; the task shows a reference with the
digest and size instead of the image, in GET and in lists; the stored input is gone once
the task ends (completed or cancelled); above the limit the answer is a 413 naming the
field, and a task document too big for Firestore is a 413 on SQLite as well.
"""

from __future__ import annotations

import hashlib

import pytest

from tests.faults.stack import FaultStack, MediaServer
from tests.large_photo import data_url, five_mb_photo_jpeg

pytestmark = [pytest.mark.e2e]


def _photo_body(media_server: MediaServer) -> dict[str, object]:
    return {
        "workflow": "face_swap",
        "environment": "face_swap",
        "task_data": {
            "source_url": data_url(five_mb_photo_jpeg(), "image/jpeg"),
            "target_url": media_server.url + "/target.png",
        },
    }


def _stored_inputs(stack: FaultStack, task_id: str) -> list[str]:
    folder = stack.data_dir / "inputs" / task_id
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def test_a_5_mb_photo_as_a_data_input_completes_and_leaves_no_copy(make_stack, media_server):
    photo = five_mb_photo_jpeg()
    stack = make_stack()

    task_id = stack.create(_photo_body(media_server))
    view = stack.wait_terminal(task_id, timeout_s=180)

    assert view["status"] == "COMPLETED", view["task"]["error"]
    source = view["task"]["params"]["input_data"]["source_url"]
    assert (
        source == f"input:{task_id}/source_url;sha256={hashlib.sha256(photo).hexdigest()};size={len(photo)}"
    )
    one = stack.client.get(f"/api/tasks/{task_id}")
    listing = stack.client.get("/api/tasks/")
    for response in (one, listing):
        assert response.status_code == 200
        assert len(response.content) < 100_000, len(response.content)
        assert "base64" not in response.text
    stack.wait_for(
        task_id, lambda _: not _stored_inputs(stack, task_id), timeout_s=30, what="without stored inputs"
    )


def test_a_cancelled_task_keeps_no_stored_input(make_stack, media_server):
    stack = make_stack(runner=False)
    task_id = stack.create(_photo_body(media_server))
    assert _stored_inputs(stack, task_id) == ["source_url"]

    cancelled = stack.client.post(f"/api/tasks/{task_id}/cancel")

    assert cancelled.status_code == 200, cancelled.text
    assert _stored_inputs(stack, task_id) == []


def test_an_input_over_fetch_max_bytes_is_a_413_naming_the_field(make_stack, media_server):
    stack = make_stack({"FETCH_MAX_BYTES": str(4_000_000)}, runner=False)

    response = stack.client.post("/api/tasks/create", json=_photo_body(media_server))

    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "input_too_large"
    assert error["details"]["field"] == "task_data.source_url"
    assert not (stack.data_dir / "inputs").exists() or not any((stack.data_dir / "inputs").iterdir())


def test_a_task_document_too_big_for_firestore_is_a_413_on_sqlite_too(make_stack):
    stack = make_stack(runner=False)
    graph = {
        "1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "note": "n" * 1_200_000}},
    }

    response = stack.client.post(
        "/api/tasks/create", json={"workflow": "custom", "task_data": {"wf_json": graph}}
    )

    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "task_too_large"
    assert stack.client.get("/api/tasks/").json()["tasks"] == []
