"""The seed's consumers call GET /api/comm/task/fetch bare (no worker_id, no environments)
and read the seed's envelope ``{code, success, data, message}``."""

from __future__ import annotations

GOOD_FACE_SWAP = {
    "workflow": "face_swap",
    "task_data": {"source_url": "https://example.com/s.jpg", "target_url": "https://example.com/t.jpg"},
}


def test_a_bare_fetch_claims_the_next_task_in_the_seed_envelope(api):
    created = api.create(GOOD_FACE_SWAP).get_json()["taskId"]

    response = api.fetch()

    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"code", "success", "data", "message"}
    assert (body["code"], body["success"], body["message"]) == (200, True, "Task fetched successfully")
    assert body["data"]["taskId"] == created and body["data"]["status"] == "FETCHED"
    assert body["data"]["lease"]["owner"].startswith("consumer:")
    assert body["data"]["params"]["input_data"]["source_url"] == "https://example.com/s.jpg"


def test_a_bare_fetch_on_an_empty_queue_answers_the_seed_envelope(api):
    response = api.fetch()

    assert response.status_code == 200
    assert response.get_json() == {"code": 204, "success": True, "data": None, "message": "No task available"}


def test_a_worker_id_given_is_still_checked(api):
    response = api.fetch(query_string={"worker_id": "w" * 200})

    assert response.status_code == 400 and "worker_id" in response.get_data(as_text=True)
