"""Issue 13, findings 1, 2, 8 and 11: what one tenant can see of, and do to, another's work.

Two client tenants (alice, bob), an admin and a runner key against the real stack (dev
server, a runner serving face swaps and ComfyUI, the ComfyUI double), through the one
host a client sees.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fakes import comfyui_double
from tests.faults.keys import api_keys_setting, tenant_keys
from tests.faults.stack import FaultStack, MediaServer, face_swap_body, running_stack
from tests.servers import ServerProcess, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEYS = tenant_keys("isolation")


def as_(who: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[who]}


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("isolation-comfy")
    double = comfyui_double.start(tmp / "c", log_dir=tmp / "logs")
    yield double
    double.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, comfyui: ServerProcess) -> Iterator[FaultStack]:
    env = {
        "API_KEYS": api_keys_setting(KEYS),
        "RUNNER_API_KEY": KEYS["runner"],
        "RUNNER_ENVIRONMENTS": "face_swap,comm",
        "COMFYUI_URL": comfyui.url,
        "RATE_LIMIT_BURST": "1000",
    }
    with running_stack(tmp_path_factory.mktemp("isolation"), env) as stack:
        yield stack


@pytest.fixture
def slow_comfyui(comfyui: ServerProcess) -> Iterator[None]:
    """KSampler takes 30 s a node: a ComfyUI task stays running until it is stopped."""
    httpx.post(comfyui.url + "/__double__/node_delay", json={"class_type": "KSampler", "seconds": 30})
    yield
    httpx.post(comfyui.url + "/__double__/reset")


def running_task(stack: FaultStack, who: str, body: dict[str, Any]) -> str:
    response = stack.client.post("/api/tasks/create", json=body, headers=as_(who))
    assert response.status_code == 200, response.text
    task_id: str = response.json()["taskId"]
    wait_until(
        lambda: stack.client.get(f"/api/tasks/{task_id}", headers=as_(who)).json()["status"] == "PROCESSING",
        timeout_s=60,
        what=f"{task_id} PROCESSING",
    )
    return task_id


def status_of(stack: FaultStack, task_id: str) -> str:
    status: str = stack.client.get(f"/api/tasks/{task_id}", headers=as_("admin")).json()["status"]
    return status


def finished(stack: FaultStack, task_id: str, who: str) -> dict[str, Any]:
    response = stack.client.get(f"/api/tasks/{task_id}?wait=25", headers=as_(who))
    view: dict[str, Any] = response.json()
    if view["status"] not in ("COMPLETED", "FAILED", "CANCELLED"):
        view = stack.wait_terminal(task_id)
    return view


COMFY_TASK = {"workflow": "basic_generation", "task_data": {"prompt": "a lighthouse", "steps": 2}}


# --- 1 and 11: status shows a client its own work only ---------------------------------------


def test_runner_and_api_status_show_a_client_only_its_own_tasks(stack, slow_comfyui):
    task_id = running_task(stack, "alice", COMFY_TASK)
    try:
        seen = {
            who: stack.client.get("/api/runner/status", headers=as_(who)).json()["in_flight"]
            for who in ("alice", "bob", "admin")
        }
        queue = {
            who: stack.client.get("/api/status", headers=as_(who)).json()["queue"]["processing"]
            for who in ("alice", "bob", "admin")
        }
    finally:
        stack.client.post(f"/api/tasks/{task_id}/cancel", headers=as_("alice"))

    assert seen == {"alice": [task_id], "bob": [], "admin": [task_id]}
    assert queue == {"alice": 1, "bob": 0, "admin": 1}


def test_runner_status_shows_a_client_no_paths_or_upstream_addresses(stack, comfyui):
    runner_status = httpx.get(stack.runner.url + "/api/status", headers=as_("bob")).json()
    admin_status = httpx.get(stack.runner.url + "/api/status", headers=as_("admin")).json()

    assert str(stack.data_dir) not in str(runner_status)
    assert comfyui.url not in str(runner_status)
    assert runner_status["engines"]["comm"]["status"] == "available"
    assert runner_status["storage"] == {"status": "configured"}
    assert comfyui.url in str(admin_status)  # an operator still sees where things are


# --- 1: results only to their owner or a signed URL ------------------------------------------


def test_results_are_served_to_the_owner_or_by_their_signed_url_only(stack, media_server: MediaServer):
    created = stack.client.post("/api/tasks/create", json=face_swap_body(media_server), headers=as_("alice"))
    view = finished(stack, created.json()["taskId"], "alice")
    assert view["status"] == "COMPLETED", view["task"]
    url = view["task"]["output_data"]["url"]
    bare = url.split("?", 1)[0]
    path = urlsplit(bare).path

    assert httpx.get(url).status_code == 200  # the signed URL, as handed out, needs no key
    assert stack.client.get(path).status_code == 401  # no signature, no key
    assert stack.client.get(path, headers=as_("bob")).status_code == 404  # another tenant's
    assert stack.client.get(path, headers=as_("alice")).status_code == 200
    assert stack.client.get(path, headers=as_("admin")).status_code == 200
    tampered = url.replace("signature=", "signature=0")
    assert httpx.get(tampered, headers=as_("bob")).status_code == 404
    expired = bare + "?expires=1000&" + url.split("&", 1)[1]
    assert httpx.get(expired, headers=as_("bob")).status_code == 404
    task_folder = path.rsplit("/", 1)[0]
    for listing in (task_folder, task_folder + "/", "/results/"):
        assert stack.client.get(listing, headers=as_("bob")).status_code == 404, listing


# --- 2: interrupt ------------------------------------------------------------------------------


def test_only_an_admin_interrupts_comfyui_globally_and_a_client_only_its_own_task(stack, slow_comfyui):
    task_id = running_task(stack, "alice", COMFY_TASK)

    by_bob = [
        stack.client.post("/api/comfyui-interrupt", headers=as_("bob")),
        stack.client.post("/api/comfyui-interrupt?prompt_id=anything", headers=as_("bob")),
        stack.client.post(f"/api/comfyui-interrupt?task_id={task_id}", headers=as_("bob")),
    ]

    assert [response.status_code for response in by_bob] == [403, 403, 404]
    assert status_of(stack, task_id) == "PROCESSING"
    by_alice = stack.client.post(f"/api/comfyui-interrupt?task_id={task_id}", headers=as_("alice"))
    assert by_alice.status_code == 200, by_alice.text
    assert finished(stack, task_id, "alice")["status"] == "CANCELLED"
    assert stack.client.post("/api/comfyui-interrupt", headers=as_("admin")).status_code == 200


# --- 8: the runner's routes are rate limited, direct jobs count as busy ------------------------


def test_runner_routes_take_tokens_from_the_callers_rate_limit(tmp_path, media_server):
    stack = FaultStack(tmp_path, {"API_KEYS": api_keys_setting(KEYS), "RUNNER_API_KEY": KEYS["runner"]})
    try:
        stack.start_runner({"RATE_LIMIT_BURST": "3", "RATE_LIMIT_PER_MINUTE": "1"})
        answers = [
            httpx.get(stack.runner.url + "/api/runner/status", headers=as_("alice")).status_code
            for _ in range(5)
        ]
        other = httpx.get(stack.runner.url + "/api/runner/status", headers=as_("bob")).status_code
    finally:
        stack.close()

    assert answers == [200, 200, 200, 429, 429]
    assert other == 200  # the limit is per tenant


def test_direct_swaps_count_as_busy_and_a_full_runner_refuses_more(stack, media_server):
    body = face_swap_body(media_server, "/slow.mp4")
    flat = {**body["task_data"]}
    answers: list[int] = []
    lock = threading.Lock()

    def swap() -> None:
        response = httpx.post(
            stack.api.url + "/api/face-swap/process", json=flat, headers=as_("bob"), timeout=300
        )
        with lock:
            answers.append(response.status_code)

    threads = [threading.Thread(target=swap) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=320)

    capacity = httpx.get(stack.runner.url + "/api/runner/status", headers=as_("admin")).json()["capacity"]
    assert len(answers) == 8
    assert answers.count(200) <= capacity, answers
    assert answers.count(429) >= 8 - capacity, answers
