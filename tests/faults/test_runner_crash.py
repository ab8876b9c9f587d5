"""Runner faults: kill -9 mid-task, SIGTERM with a task in flight, a duplicate push delivery.

Each test starts its own stack (dev server + runner subprocesses on 127.0.0.1), breaks it
the way production breaks (a preempted VM, a rolling deploy, Cloud Tasks delivering at
least once) and checks that the task still ends exactly once, with one result object.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.faults.conftest import LONG_CLIP_FRAMES
from tests.faults.stack import MediaServer, face_swap_body

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEASE_SECONDS = 5
CLEAN_EXIT = {0, -signal.SIGTERM}


def test_kill_9_mid_swap_task_completes_after_lease_expiry_with_one_result(
    make_stack, media_server, record_figure
):
    stack = make_stack({"LEASE_SECONDS": str(LEASE_SECONDS), "MAX_ATTEMPTS": "3"})
    first_runner = stack.runner
    task_id = stack.video_mid_swap(media_server, frames=5)

    first_runner.kill()
    killed_at = time.monotonic()
    assert stack.view(task_id)["status"] == "PROCESSING"
    assert stack.result_files(task_id) == []
    stack.start_runner()
    stack.wait_for(
        task_id,
        lambda view: (
            view["status"] in ("FETCHED", "PROCESSING", "COMPLETED") and view["task"]["attempts"] >= 2
        ),
        timeout_s=120,
        what="running again",
    )
    recovery_s = time.monotonic() - killed_at
    record_figure(
        f"pull (SQLite), kill -9 -> running again: {recovery_s:.1f} s (LEASE_SECONDS={LEASE_SECONDS})"
    )
    assert recovery_s <= LEASE_SECONDS + 15
    view = stack.wait_terminal(task_id, timeout_s=120)

    assert view["status"] == "COMPLETED", view["task"]["error"]
    task = view["task"]
    # Not picked up again before the dead runner's lease ran out.
    assert time.monotonic() - killed_at >= LEASE_SECONDS - 1
    lost = task["attempt_history"]
    assert lost and lost[0]["attempt"] == 1
    # Every lost attempt is recorded. Usually one; two when the dead runner's long-poll,
    # still open at the API (which cannot see the client is gone), claimed the re-queued
    # task before it ended: that claim is lost too, and reaped after another lease.
    assert all(entry["code"] == "lease_expired" for entry in lost), lost
    assert all(entry["runner"].endswith(f"-{first_runner.pid}") for entry in lost), lost
    assert task["attempts"] == len(lost) + 1 <= 3
    assert len(stack.result_files(task_id)) == 1
    assert task["output_data"]["outputs"][0]["frames"] == LONG_CLIP_FRAMES
    assert stack.client.get(task["output_data"]["url"]).status_code == 200
    assert len(stack.runner_events("task_finished", task_id)) == 1


def test_sigterm_releases_in_flight_task_uncounted_and_a_new_runner_completes_it(make_stack, media_server):
    stack = make_stack({"SHUTDOWN_GRACE_S": "1", "MAX_ATTEMPTS": "1"})
    task_id = stack.video_mid_swap(media_server, frames=3, clip="/long.mp4")

    shutdown_s = stack.stop_runner_gracefully()

    assert shutdown_s < 15, f"shutdown took {shutdown_s:.1f}s with SHUTDOWN_GRACE_S=1"
    released = stack.view(task_id)["task"]
    assert released["status"] == "PENDING"
    # Released, not failed: MAX_ATTEMPTS=1, yet the task may run again.
    assert released["attempts"] == 0 and released["lease"] is None
    assert {entry.get("released") for entry in released["attempt_history"]} <= {"shutdown", "draining"}
    assert released["attempt_history"][0]["released"] == "shutdown"
    assert stack.runner_events("draining")
    assert stack.runner_events("task_released", task_id)
    assert stack.result_files(task_id) == []
    # Nothing is left leased to the runner that is gone (a fetch still in flight when the
    # drain began hands back whatever it was given).
    leased = stack.client.get("/api/tasks/", params={"status": "FETCHED,PROCESSING"}).json()
    assert leased["tasks"] == []

    stack.start_runner()
    view = stack.wait_terminal(task_id, timeout_s=120)

    assert view["status"] == "COMPLETED", view["task"]["error"]
    assert view["task"]["attempts"] == 1
    assert len(stack.result_files(task_id)) == 1


def test_sigterm_lets_a_task_that_fits_the_grace_finish(make_stack, media_server):
    stack = make_stack({"SHUTDOWN_GRACE_S": "60"})
    # 600 frames: mid-swap when SIGTERM lands even on a quiet machine (~9 s there), done well
    # inside the 60 s grace on a busy one.
    task_id = stack.video_mid_swap(media_server, frames=3)

    exit_code = stack.sigterm_runner(timeout_s=90)

    assert exit_code in CLEAN_EXIT, stack.runner_log()[-2000:]
    view = stack.view(task_id)
    assert view["status"] == "COMPLETED", view["task"]
    assert view["task"]["attempts"] == 1
    assert len(stack.result_files(task_id)) == 1


def _deliver(url: str, task_id: str, headers: dict[str, str], barrier: threading.Barrier) -> httpx.Response:
    barrier.wait(timeout=10)
    return httpx.post(url, json={"task_id": task_id}, headers=headers, timeout=120)


def test_same_task_pushed_twice_at_once_runs_the_engine_once(make_stack, media_server: MediaServer):
    from shared.auth import hash_api_key

    keys = {"runner": "csk_runner_key_for_push", "client": "csk_client_key_for_push"}
    api_keys = f"{hash_api_key(keys['runner'])}:runner:runner,{hash_api_key(keys['client'])}:acme:client"
    stack = make_stack(
        {"API_KEYS": api_keys, "RUNNER_API_KEY": keys["runner"]}, runner_env={"DISPATCH_MODE": "push"}
    )
    client_headers = {"X-API-Key": keys["client"]}
    response = stack.client.post(
        "/api/tasks/create", json=face_swap_body(media_server, "/short.mp4"), headers=client_headers
    )
    task_id = response.json()["taskId"]
    push_url = stack.runner.url + "/internal/tasks/run"
    assert httpx.post(push_url, json={"task_id": task_id}).status_code == 401
    assert httpx.post(push_url, json={"task_id": task_id}, headers=client_headers).status_code == 403

    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def deliver(index: int) -> None:
        results[index] = _deliver(push_url, task_id, {"X-API-Key": keys["runner"]}, barrier)

    threads = [threading.Thread(target=deliver, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    late = httpx.post(push_url, json={"task_id": task_id}, headers={"X-API-Key": keys["runner"]}, timeout=30)

    bodies = sorted((response.status_code, response.json()["status"]) for response in results)
    assert bodies == [(200, "COMPLETED"), (200, "not_claimable")]
    assert (late.status_code, late.json()["status"]) == (200, "not_claimable")
    view = stack.client.get(f"/api/tasks/{task_id}", headers=client_headers).json()
    assert view["status"] == "COMPLETED" and view["task"]["attempts"] == 1
    assert len(stack.runner_events("task_finished", task_id)) == 1
    assert len(stack.runner_events("push_duplicate", task_id)) == 2
    assert len(stack.result_files(task_id)) == 1
