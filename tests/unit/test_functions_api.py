"""The seed's routes and shapes, through the real functions-framework, on SQLite."""

from __future__ import annotations

from typing import Any

import pytest

GOOD_FACE_SWAP = {
    "workflow": "face_swap",
    "environment": "face_swap",
    "task_data": {
        "source_url": "https://example.com/source.jpg",
        "target_url": "https://example.com/target.jpg",
    },
}


def _task_count(api: Any) -> int:
    return len(api.list().get_json()["tasks"])


def test_create_face_swap_returns_seed_shape_and_stores_unified_format(api):
    response = api.create(GOOD_FACE_SWAP)

    assert response.status_code == 200
    body = response.get_json()
    task = body["task"]
    assert body["taskId"] == task["taskId"] and task["taskId"].startswith("task_")
    assert task["workflow"] == task["workflow_name"] == "face_swap"
    assert task["environment"] == "face_swap" and task["target_port"] == 8000
    assert task["params"]["input_data"] == {
        "source_url": "https://example.com/source.jpg",
        "target_url": "https://example.com/target.jpg",
        "resolution": "1024x1024",
        "model": "inswapper_128_fp16",
        "face_selector": "largest",
    }
    assert task["status"] == "PENDING"
    assert task["created_at"].endswith("Z")  # ISO-8601 UTC


def test_a_created_task_is_serialised_once_and_answered_as_stored(api, monkeypatch):
    """issue 15: the size check's JSON is the stored row and the answer reuses it (create_task
    serialised the task three times: size check, row, answer; then the document dict and
    json.dumps of it: now pydantic writes the JSON once and nothing builds the dict)."""
    from shared.tasks import Task

    serialised: list[str] = []
    to_document, model_dump_json = Task.to_document, Task.model_dump_json

    def counting_document(task: Task) -> dict[str, Any]:
        serialised.append("document")
        return to_document(task)

    def counting_json(task: Task, **kwargs: Any) -> str:
        serialised.append("json")
        return model_dump_json(task, **kwargs)

    monkeypatch.setattr(Task, "to_document", counting_document)
    monkeypatch.setattr(Task, "model_dump_json", counting_json)
    response = api.create(GOOD_FACE_SWAP)
    assert response.status_code == 200
    assert serialised == ["json"]
    monkeypatch.undo()

    answered = response.get_json()["task"]
    assert api.get(answered["taskId"]).get_json()["task"] == answered


def test_get_task_answers_task_status_result(api):
    task_id = api.create(GOOD_FACE_SWAP).get_json()["taskId"]

    body = api.get(task_id).get_json()

    assert set(body) >= {"task", "status", "result"}
    assert body["status"] == "PENDING" and body["result"] is None


def test_face_swap_shortcut_route(api):
    response = api.clients["create_task"].post(
        "/api/face-swap/create-task",
        json={"source_url": "https://a.example/s.jpg", "target_url": "https://a.example/t.jpg"},
    )

    assert response.status_code == 200
    assert response.get_json()["task"]["workflow"] == "face_swap"


def test_template_task_holds_generated_workflow_with_random_seed(api):
    first = api.create({"workflow": "basic_generation", "task_data": {"prompt": "a cat"}}).get_json()["task"]
    second = api.create({"workflow": "basic_generation", "task_data": {"prompt": "a cat"}}).get_json()["task"]

    graph = first["params"]["input_data"]["wf_json"]
    assert first["environment"] == "comm" and first["target_port"] == 3001
    assert graph["6"]["inputs"]["text"] == "a cat"
    assert graph["3"]["class_type"] == "KSampler"
    assert graph["3"]["inputs"]["seed"] != second["params"]["input_data"]["wf_json"]["3"]["inputs"]["seed"]


@pytest.mark.parametrize(
    ("task_data", "field", "reason_part"),
    [
        ({"target_url": "https://e.com/t.jpg"}, "task_data.source_url", "required"),
        ({"source_url": "https://e.com/s.jpg"}, "task_data.target_url", "required"),
        ({**GOOD_FACE_SWAP["task_data"], "resolution": "big"}, "task_data.resolution", "1024x1024"),
        ({**GOOD_FACE_SWAP["task_data"], "resolution": "99999x1"}, "task_data.resolution", ""),
        ({**GOOD_FACE_SWAP["task_data"], "model": "deepfake_9000"}, "task_data.model", "unknown model"),
        ({**GOOD_FACE_SWAP["task_data"], "source_url": "file:///etc/passwd"}, "task_data.source_url", ""),
        ({**GOOD_FACE_SWAP["task_data"], "source_url": "gopher://e.com/x"}, "task_data.source_url", ""),
        ({**GOOD_FACE_SWAP["task_data"], "source_url": "http://127.0.0.1/a.jpg"}, "task_data.source_url", ""),
        ({**GOOD_FACE_SWAP["task_data"], "target_url": "http://[::1]/a.jpg"}, "task_data.target_url", ""),
        ({**GOOD_FACE_SWAP["task_data"], "target_url": "http://10.1.2.3/a.jpg"}, "task_data.target_url", ""),
        (
            {**GOOD_FACE_SWAP["task_data"], "target_url": "http://169.254.169.254/x"},
            "task_data.target_url",
            "",
        ),
        ({**GOOD_FACE_SWAP["task_data"], "source_url": "http://u:p@e.com/a.jpg"}, "task_data.source_url", ""),
        ({**GOOD_FACE_SWAP["task_data"], "surprise": 1}, "task_data.surprise", "unknown field"),
    ],
)
def test_bad_face_swap_input_is_a_400_naming_the_field_and_changes_nothing(
    api, task_data, field, reason_part
):
    before = _task_count(api)

    response = api.create({"workflow": "face_swap", "task_data": task_data})

    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["details"]["field"] == field
    assert reason_part in error["details"]["reason"]
    assert _task_count(api) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"workflow": "no_such_flow"}, "workflow"),
        (
            {"workflow": "face_swap", "environment": "comm", "task_data": GOOD_FACE_SWAP["task_data"]},
            "environment",
        ),
        ({"workflow": "basic_generation", "environment": "mars"}, "environment"),
        ({"workflow": "basic_generation", "task_data": {"steps": 0}}, "task_data.steps"),
        ({"workflow": "basic_generation", "priority": 11}, "priority"),
        (
            {"workflow": "custom", "task_data": {"wf_json": {"1": {"inputs": {}}}}},
            "task_data.wf_json.1.class_type",
        ),
        ([1, 2], "body"),
    ],
)
def test_bad_create_requests(api, body, field):
    response = api.create(body)

    assert response.status_code == 400
    assert response.get_json()["error"]["details"]["field"] == field


def test_malformed_json_is_a_400(api):
    response = api.clients["create_task"].post(
        "/api/tasks/create", data=b"{not json", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400
    assert response.get_json()["error"]["details"]["field"] == "body"


def test_oversized_body_is_a_413(api, monkeypatch):
    monkeypatch.setenv("MAX_REQUEST_BYTES", "1000")
    from shared.http import service
    from shared.settings import reset_settings_cache

    reset_settings_cache()
    service.cache_clear()

    response = api.create({"workflow": "basic_generation", "task_data": {"prompt": "x" * 2000}})

    assert response.status_code == 413


def test_unknown_task_is_404(api):
    response = api.get("task_doesnotexist")

    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "task_not_found"


def test_fetch_claims_oldest_highest_priority_in_seed_envelope(api):
    low = api.create({**GOOD_FACE_SWAP, "priority": 1}).get_json()["taskId"]
    high = api.create({**GOOD_FACE_SWAP, "priority": 9}).get_json()["taskId"]

    first = api.fetch(query_string={"worker_id": "w1", "environments": "face_swap"}).get_json()
    second = api.fetch(query_string={"worker_id": "w1", "environments": "face_swap"}).get_json()
    empty = api.fetch(query_string={"worker_id": "w1", "environments": "face_swap"}).get_json()

    assert (
        first["code"] == 200 and first["success"] is True and first["message"] == "Task fetched successfully"
    )
    assert [first["data"]["taskId"], second["data"]["taskId"]] == [high, low]
    assert first["data"]["status"] == "FETCHED" and first["data"]["lease"]["owner"] == "w1"
    assert empty["data"] is None


def test_list_has_queue_length(api):
    api.create(GOOD_FACE_SWAP)
    api.create(GOOD_FACE_SWAP)

    body = api.list().get_json()

    assert body["queue_length"] == 2
    assert len(body["tasks"]) == 2


def test_cancel_pending_then_conflict(api):
    task_id = api.create(GOOD_FACE_SWAP).get_json()["taskId"]
    client = api.clients["create_task"]

    first = client.post(f"/api/tasks/{task_id}/cancel")
    second = client.post(f"/api/tasks/{task_id}/cancel")

    assert first.status_code == 200 and first.get_json()["status"] == "CANCELLED"
    assert second.status_code == 409


def test_idempotency_key_replays_and_refuses_other_body(api):
    headers = {"Idempotency-Key": "order-42"}
    first = api.create(GOOD_FACE_SWAP, headers=headers)
    again = api.create(GOOD_FACE_SWAP, headers=headers)
    other = api.create({**GOOD_FACE_SWAP, "priority": 9}, headers=headers)

    assert first.get_json()["taskId"] == again.get_json()["taskId"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409
    assert _task_count(api) == 1


def test_health_and_status(api):
    health = api.clients["get_task"].get("/api/health").get_json()
    status = api.clients["create_task"].get("/api/status").get_json()

    assert health["status"] == "healthy"
    assert status["api"] == "healthy" and status["queue_length"] == 0


def test_wrong_method_is_405(api):
    response = api.clients["get_task"].post("/api/tasks/task_x")

    assert response.status_code == 405


def test_model_the_configured_engine_cannot_run_is_a_400(api, monkeypatch):
    monkeypatch.setenv("FACE_SWAP_ENGINE", "facefusion_api")
    from shared.http import service
    from shared.settings import reset_settings_cache

    reset_settings_cache()
    service.cache_clear()
    body = {**GOOD_FACE_SWAP, "task_data": {**GOOD_FACE_SWAP["task_data"], "model": "hyperswap_1a_256"}}

    response = api.create(body)

    assert response.status_code == 400
    assert response.get_json()["error"]["details"]["field"] == "task_data.model"
    assert response.get_json()["error"]["code"] == "model_not_supported"


def test_get_task_wait_holds_until_the_task_ends(api):
    import threading
    import time

    from shared.http import service
    from shared.tasks import TaskStatus, apply_transition

    task_id = api.create(GOOD_FACE_SWAP).get_json()["taskId"]
    client = api.clients["get_task"]

    started = time.monotonic()
    still_pending = client.get(f"/api/tasks/{task_id}?wait=0.2").get_json()
    assert still_pending["status"] == "PENDING"
    assert time.monotonic() - started >= 0.2  # held for the whole wait

    def cancel_soon() -> None:
        time.sleep(0.3)
        service().store.update(task_id, lambda task: apply_transition(task, TaskStatus.CANCELLED))

    canceller = threading.Thread(target=cancel_soon)
    started = time.monotonic()
    canceller.start()
    ended = client.get(f"/api/tasks/{task_id}?wait=10").get_json()
    canceller.join()
    assert ended["status"] == "CANCELLED"
    assert 0.25 <= time.monotonic() - started < 5  # answered when the task ended, not after 10 s

    started = time.monotonic()
    assert client.get(f"/api/tasks/{task_id}?wait=10").get_json()["status"] == "CANCELLED"
    assert time.monotonic() - started < 1  # already terminal: no wait

    assert client.get(f"/api/tasks/{task_id}?wait=26").status_code == 400
    assert client.get(f"/api/tasks/{task_id}?wait=-1").status_code == 400
    assert client.get(f"/api/tasks/{task_id}?wait=soon").status_code == 400
    assert client.get("/api/tasks/task_unknown?wait=1").status_code == 404


@pytest.mark.parametrize("with_inputs", [True, False])
def test_the_task_as_answered_is_task_views_document(with_inputs):
    """issue 15: get_task and fetch_task write the task with pydantic's JSON serializer; it
    must be task_view's document, inputs withheld the same way (input: references kept)."""
    import datetime as dt
    import json

    from shared.service import TaskService
    from shared.tasks import Lease, Task, TaskError, TaskStatus

    tasks = [
        Task(
            workflow="face_swap",
            environment="face_swap",
            params={"input_data": {"source_url": "https://example.com/é.jpg", "target_url": "input:ab:12"}},
            request_fingerprint="f" * 64,
            idempotency_key="k",
        ),
        Task(
            workflow="image_to_image",
            environment="comm",
            status=TaskStatus.COMPLETED,
            params={
                "input_data": {
                    "wf_json": {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}},
                    "template_params": {"image_url": "https://example.com/a.png", "prompt": "p"},
                    "image_inputs": [{"param": "image_url", "node": "1", "url": "https://example.com/a.png"}],
                }
            },
            output_data={"images": ["https://cdn.example.com/o.png"], "n": 1.5},
            timings={"engine_s": 0.25},
            lease=Lease(owner="runner-1", expires_at=dt.datetime(2026, 12, 2, tzinfo=dt.UTC)),
        ),
        Task(
            workflow="face_swap",
            environment="face_swap",
            status=TaskStatus.FAILED,
            error=TaskError(code="no_face", message="no face", details={"field": "source_url"}),
        ),
    ]
    for task in tasks:
        view = TaskService.task_view(task, with_inputs=with_inputs)
        assert json.loads(TaskService.task_json(task, with_inputs=with_inputs)) == view["task"]
        assert TaskService.task_view_members(task) == {
            key: view[key] for key in ("status", "result", "error")
        }
