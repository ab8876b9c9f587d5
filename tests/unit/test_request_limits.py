"""Issue 13, findings 9 and 10 at create: JSON and workflow depth, template sizes.

Through the real functions-framework on SQLite: a 400 naming the field, and nothing stored.
"""

from __future__ import annotations

from typing import Any


def nested_graph(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return {"1": {"class_type": "PrimitiveNode", "inputs": {"value": value}}}


def _count(api: Any) -> int:
    return len(api.list().get_json()["tasks"])


def test_a_workflow_nested_252_deep_is_a_400_at_create(api):
    response = api.create({"workflow": "custom", "task_data": {"wf_json": nested_graph(252)}})

    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["details"]["field"] in ("body", "task_data.wf_json")
    assert "deeper than" in error["details"]["reason"]
    assert _count(api) == 0


def test_a_workflow_too_deep_for_the_task_document_is_a_400(api):
    # Within the body's limit, but deeper than a task document can hold in Firestore.
    response = api.create({"workflow": "custom", "task_data": {"wf_json": nested_graph(14)}})

    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["details"]["field"] == "task_data.wf_json"


def test_a_normal_graph_depth_is_accepted(api):
    response = api.create({"workflow": "custom", "task_data": {"wf_json": nested_graph(3)}})

    assert response.status_code == 200, response.get_json()


def test_a_thousand_nested_brackets_are_a_400_not_a_500(api):
    response = api.clients["create_task"].post(
        "/api/tasks/create", data=b"[" * 1000 + b"]" * 1000, content_type="application/json"
    )

    assert response.status_code == 400
    assert response.get_json()["error"]["details"]["field"] == "body"


def test_invert_image_refuses_8192_pixel_sides(api):
    response = api.create(
        {
            "workflow": "invert_image",
            "task_data": {"image_url": "https://example.com/in.png", "width": 8192, "height": 8192},
        }
    )

    assert response.status_code == 400
    assert response.get_json()["error"]["details"]["field"] == "task_data.width"
