"""Auth matrix: every public route x (no key, wrong key, other tenant's key, own key, admin
key) through the one host a client sees (the dev server, which forwards runner routes).

The expected answers are data (MATRIX), read as the documented contract: no or unknown
key 401; a task is visible only to the key that created it (another tenant gets 404 on
get and cancel) and to admins; admin routes 403 for client keys; fetch_task needs runner
credentials (403 for a client key); health, the OpenAPI document and the runner's
face-swap health and workflow list are public.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults.keys import api_keys_setting, tenant_keys
from tests.faults.stack import FaultStack, MediaServer, running_stack
from tests.servers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEYS = tenant_keys("matrix")

# Columns: who calls. "own" is alice, who creates every task the routes name; "other" is bob.
CALLERS: dict[str, dict[str, str]] = {
    "none": {},
    "wrong": {"X-API-Key": "csk_not_a_key_anyone_has"},
    "other": {"X-API-Key": KEYS["bob"]},
    "own": {"X-API-Key": KEYS["alice"]},
    "admin": {"X-API-Key": KEYS["admin"]},
}

COMFY_BODY = {"workflow": "basic_generation", "task_data": {"prompt": "a lighthouse"}}
SWAP = "face-swap body"  # replaced by a face-swap body on the media server

#          method, path,                             body,         none wrong other own  admin
MATRIX: list[tuple[str, str, Any, tuple[int, int, int, int, int]]] = [
    (
        "GET",
        "/api/comm/task/fetch?worker_id=matrix&environments=face_swap&wait=0",
        None,
        (401, 401, 403, 403, 200),
    ),
    ("GET", "/api/health", None, (200, 200, 200, 200, 200)),
    ("GET", "/api/openapi.json", None, (200, 200, 200, 200, 200)),
    ("GET", "/api/status", None, (401, 401, 200, 200, 200)),
    ("POST", "/api/tasks/create", COMFY_BODY, (401, 401, 200, 200, 200)),
    ("POST", "/api/face-swap/create-task", SWAP, (401, 401, 200, 200, 200)),
    ("GET", "/api/tasks/{task_id}", None, (401, 401, 404, 200, 200)),
    ("POST", "/api/tasks/{task_id}/cancel", None, (401, 401, 404, 200, 200)),
    ("DELETE", "/api/tasks/{task_id}", None, (401, 401, 404, 200, 200)),
    ("GET", "/api/tasks/", None, (401, 401, 200, 200, 200)),
    ("GET", "/api/face-swap/queue-status", None, (401, 401, 200, 200, 200)),
    ("POST", "/internal/reap", None, (401, 401, 403, 403, 200)),
    ("GET", "/api/admin/stats", None, (401, 401, 403, 403, 200)),
    # The console's static page is public; the calls it makes carry the key.
    ("GET", "/console", None, (200, 200, 200, 200, 200)),
    # Runner routes, forwarded by the one host.
    ("GET", "/api/runner/status", None, (401, 401, 200, 200, 200)),
    ("GET", "/api/runner/health", None, (401, 401, 200, 200, 200)),
    ("GET", "/api/face-swap/health", None, (200, 200, 200, 200, 200)),
    ("GET", "/api/face-swap/workflows", None, (200, 200, 200, 200, 200)),
    # Authenticated first; this runner serves no ComfyUI, hence 503 for known keys.
    ("GET", "/api/comfyui-queue-status", None, (401, 401, 503, 503, 503)),
    ("POST", "/api/face-swap/process", SWAP, (401, 401, 200, 200, 200)),
]

CELLS = [
    pytest.param(method, path, body, caller, expected, id=f"{method} {path.split('?')[0]} as {caller}")
    for method, path, body, answers in MATRIX
    for caller, expected in zip(CALLERS, answers, strict=True)
]


@pytest.fixture(scope="module")
def media_for_matrix() -> Iterator[MediaServer]:
    import cv2

    from tests.faceswap.media import grace_hopper_bgr
    from tests.faults.conftest import astronaut_head

    server = MediaServer()
    server.add("/source.jpg", "image/jpeg", cv2.imencode(".jpg", grace_hopper_bgr())[1].tobytes())
    server.add("/target.png", "image/png", cv2.imencode(".png", astronaut_head(192))[1].tobytes())
    with server.running():
        yield server


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    # The runner serves face_swap only, so alice's ComfyUI tasks stay PENDING (cancellable).
    env = {"API_KEYS": api_keys_setting(KEYS), "RUNNER_API_KEY": KEYS["runner"], "RATE_LIMIT_BURST": "100000"}
    with running_stack(tmp_path_factory.mktemp("auth"), env) as stack:
        yield stack


def _wait_until_runner_idle(stack: FaultStack) -> None:
    """The direct swap answers 429 runner_busy while queued swaps (from the create rows) run."""

    def idle() -> bool:
        snapshot = stack.client.get("/api/runner/status", headers=CALLERS["admin"]).json()
        return not snapshot["in_flight"]

    wait_until(idle, timeout_s=60, interval_s=0.1, what="the runner to finish queued swaps")


def _alice_task(stack: FaultStack) -> str:
    return stack.create(COMFY_BODY, headers=CALLERS["own"])


@pytest.mark.parametrize(("method", "path", "body", "caller", "expected"), CELLS)
def test_route_answers_the_documented_status_for_each_caller(
    keyed_stack: FaultStack, media_for_matrix: MediaServer, method, path, body, caller, expected
):
    if "{task_id}" in path:
        path = path.format(task_id=_alice_task(keyed_stack))
    if path == "/api/face-swap/process":
        _wait_until_runner_idle(keyed_stack)
    if body == SWAP:
        body = {
            "source_url": media_for_matrix.url + "/source.jpg",
            "target_url": media_for_matrix.url + "/target.png",
        }

    response = keyed_stack.client.request(method, path, json=body, headers=CALLERS[caller], timeout=60)

    assert response.status_code == expected, response.text[:500]
    if expected in (401, 403, 404):
        error = response.json()["error"]
        assert error["code"] and error["message"]


def test_list_shows_a_client_only_its_own_tasks_and_an_admin_all(keyed_stack: FaultStack):
    alice = {_alice_task(keyed_stack) for _ in range(2)}
    bob = {keyed_stack.create(COMFY_BODY, headers=CALLERS["other"])}

    def listed(caller: str) -> set[str]:
        response = keyed_stack.client.get("/api/tasks/", params={"limit": 500}, headers=CALLERS[caller])
        assert response.status_code == 200
        return {task["taskId"] for task in response.json()["tasks"]}

    assert alice <= listed("own") and not bob & listed("own")
    assert bob <= listed("other") and not alice & listed("other")
    assert alice | bob <= listed("admin")
    owners = {
        task["owner"]
        for task in keyed_stack.client.get(
            "/api/tasks/", params={"limit": 500}, headers=CALLERS["own"]
        ).json()["tasks"]
    }
    assert owners == {"alice"}


def test_fetch_task_answers_the_runner_key(keyed_stack: FaultStack):
    response = keyed_stack.client.get(
        "/api/comm/task/fetch",
        params={"worker_id": "matrix-runner", "environments": "face_swap", "wait": 0},
        headers={"X-API-Key": KEYS["runner"]},
    )

    assert response.status_code == 200
    assert response.json()["success"] is True


def test_a_bearer_token_is_the_same_key(keyed_stack: FaultStack):
    task_id = _alice_task(keyed_stack)

    as_bearer = keyed_stack.client.get(
        f"/api/tasks/{task_id}", headers={"Authorization": f"Bearer {KEYS['alice']}"}
    )
    as_bob = keyed_stack.client.get(
        f"/api/tasks/{task_id}", headers={"Authorization": f"Bearer {KEYS['bob']}"}
    )

    assert (as_bearer.status_code, as_bob.status_code) == (200, 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/tasks/create"),
        ("GET", "/api/tasks/"),
        ("POST", "/api/face-swap/process"),
    ],
)
def test_runner_credentials_claim_work_but_cannot_submit_or_read_it(keyed_stack: FaultStack, method, path):
    response = keyed_stack.client.request(
        method, path, json={"workflow": "basic_generation"}, headers={"X-API-Key": KEYS["runner"]}
    )

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "client_required"
