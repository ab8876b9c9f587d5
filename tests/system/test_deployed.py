"""System tests against a deployed API: `make smoke BASE_URL=https://... ` (with
COMFYSWAP_API_KEY set to a client key). Skipped when BASE_URL is not set.

They exercise what a client does: health, the OpenAPI document, auth, a face swap from
package-shipped photos sent as data: URLs, and the result download."""

from __future__ import annotations

import base64
import io
import os
import time

import httpx
import pytest

BASE_URL = os.environ.get("BASE_URL", "").rstrip("/")
API_KEY = os.environ.get("COMFYSWAP_API_KEY", "")

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not BASE_URL, reason="set BASE_URL (and COMFYSWAP_API_KEY) to test a deployment"),
]


@pytest.fixture(scope="module")
def client():
    with httpx.Client(base_url=BASE_URL, headers={"X-API-Key": API_KEY}, timeout=60.0) as http:
        yield http


def test_health_is_public(client):
    response = httpx.get(f"{BASE_URL}/api/health", timeout=30)

    assert response.status_code == 200
    assert response.json()["status"] == "healthy"


def test_requests_without_a_key_are_refused():
    response = httpx.get(f"{BASE_URL}/api/tasks/task_doesnotexist", timeout=30)

    assert response.status_code in (401, 403)


def test_face_swap_round_trip(client, grace_hopper_path, astronaut_png):
    from PIL import Image

    def data_url(path, content_type):
        return f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode()}"

    created = client.post(
        "/api/tasks/create",
        json={
            "workflow": "face_swap",
            "task_data": {
                "source_url": data_url(grace_hopper_path, "image/jpeg"),
                "target_url": data_url(astronaut_png, "image/png"),
            },
        },
    )
    assert created.status_code == 200, created.text
    task_id = created.json()["taskId"]

    deadline = time.monotonic() + 900  # a cold GPU instance may take minutes to start
    while True:
        view = client.get(f"/api/tasks/{task_id}").json()
        if view["status"] in ("COMPLETED", "FAILED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(2)

    assert view["status"] == "COMPLETED", view
    result = httpx.get(view["result"]["url"], timeout=60)
    assert result.status_code == 200
    assert Image.open(io.BytesIO(result.content)).size == (512, 512)
