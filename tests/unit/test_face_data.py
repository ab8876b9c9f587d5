"""Issue 13, finding 6 / Build 3: input URLs (face photos) are never in lists or webhooks,
and a finished task no longer shows them; the owner sees them only while the task runs."""

from __future__ import annotations

import json
import logging

import pytest

from shared.tasks import WITHHELD, Task
from shared.webhooks import event_body

SOURCE = "https://example.com/people/grace.jpg"
TARGET = "https://example.com/people/astronaut.jpg"
BODY = {
    "workflow": "face_swap",
    "environment": "face_swap",
    "task_data": {"source_url": SOURCE, "target_url": TARGET},
}


def test_a_running_task_shows_its_owner_the_inputs_a_list_never_does(api):
    task_id = api.create(BODY).get_json()["taskId"]

    one = api.get(task_id).get_json()["task"]["params"]["input_data"]
    listed = api.list().get_json()["tasks"][0]["params"]["input_data"]

    assert (one["source_url"], one["target_url"]) == (SOURCE, TARGET)
    assert (listed["source_url"], listed["target_url"]) == (WITHHELD, WITHHELD)
    assert SOURCE not in json.dumps(api.list().get_json())


def test_a_finished_task_returns_no_input_url_from_any_route(api, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    task_id = api.create(BODY).get_json()["taskId"]

    cancelled = api.clients["create_task"].post(f"/api/tasks/{task_id}/cancel").get_json()
    after = api.get(task_id).get_json()
    waited = api.get(task_id, query_string={"wait": "1"}).get_json()
    listed = api.list().get_json()

    for answer in (cancelled, after, waited, listed):
        assert SOURCE not in json.dumps(answer) and TARGET not in json.dumps(answer)
    assert after["task"]["params"]["input_data"]["source_url"] == WITHHELD
    assert SOURCE not in caplog.text and TARGET not in caplog.text


def test_a_webhook_body_never_carries_input_urls():
    task = Task(
        workflow="invert_image",
        environment="comm",
        params={
            "input_data": {
                "wf_json": {},
                "template_params": {"image_url": SOURCE},
                "image_inputs": [{"param": "image_url", "url": TARGET, "node": "1", "input": "image"}],
            }
        },
    )

    body = json.dumps(event_body(task))

    assert SOURCE not in body and TARGET not in body
