"""Dependency faults: the primary storage provider down, ComfyUI killed mid-run, and a
client cancelling a task while the engine swaps a video."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fakes import comfyui_double
from tests.faults.conftest import LONG_CLIP_FRAMES
from tests.faults.stack import FaultStack, face_swap_body
from tests.servers import ServerProcess, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_primary_storage_down_result_goes_to_fallback_and_the_failure_is_recorded(make_stack, media_server):
    closed_port = free_port()  # nothing listens here: every R2 call is refused at once
    stack = make_stack(
        {
            "STORAGE_PROVIDER": "r2",
            "STORAGE_FALLBACK": "local",
            "R2_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}",
            "R2_BUCKET_NAME": "results",
            "R2_ACCESS_KEY": "test-access",
            "R2_SECRET_KEY": "test-secret",
        }
    )

    task_id = stack.create(face_swap_body(media_server))
    view = stack.wait_terminal(task_id, timeout_s=120)

    assert view["status"] == "COMPLETED", view["task"]["error"]
    output_data = view["task"]["output_data"]
    assert output_data["provider"] == "local"
    tried = output_data["outputs"][0]["storage"]["tried"]
    assert [entry["provider"] for entry in tried] == ["r2"]
    assert tried[0]["code"] and tried[0]["error"]
    assert view["task"]["attempts"] == 1
    assert len(stack.result_files(task_id)) == 1
    assert stack.client.get(output_data["url"]).status_code == 200
    assert stack.runner_events("storage_provider_failed")


def test_cancel_during_video_swap_stops_between_frames_and_writes_nothing(make_stack, media_server):
    stack = make_stack()
    task_id = stack.video_mid_swap(media_server, frames=3)

    response = stack.client.post(f"/api/tasks/{task_id}/cancel")
    cancelled_at = time.monotonic()

    assert response.status_code == 200 and response.json()["status"] == "CANCELLED"
    wait_until(
        lambda: bool(stack.runner_events("task_stopped", task_id)),
        timeout_s=10,
        what="the runner to stop the engine",
    )
    # Stopped between frames, long before the 600-frame clip could have finished.
    assert time.monotonic() - cancelled_at < 10
    stopped = stack.runner_events("task_stopped", task_id)[0]
    assert stopped["status"] == "CANCELLED"
    view = stack.view(task_id)
    assert view["status"] == "CANCELLED" and view["result"] is None
    assert view["task"]["progress"]["value"] < LONG_CLIP_FRAMES
    assert stack.result_files(task_id) == []
    assert stack.runner_events("task_finished", task_id) == []
    assert stack.client.post(f"/api/tasks/{task_id}/cancel").status_code == 409
    # The runner is free again: the next task runs.
    follow_up = stack.create(face_swap_body(media_server))
    assert stack.wait_terminal(follow_up, timeout_s=60)["status"] == "COMPLETED"


# --- ComfyUI ----------------------------------------------------------------------------

SLOW_GRAPH: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 255}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fault"}},
}


@pytest.fixture
def comfyui(tmp_path: Path) -> Iterator[Callable[[], ServerProcess]]:
    """``comfyui()``: a ComfyUI double on this test's one port, a new one each call (ComfyUI
    back after a crash); every one is stopped when the test ends."""
    port = free_port()
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        name = f"comfyui-double-{len(started) + 1}"
        started.append(
            comfyui_double.start(tmp_path / "comfy", port=port, name=name, log_dir=tmp_path / "logs")
        )
        return started[-1]

    yield start
    for double in started:
        double.stop()


def _slow_nodes(double: ServerProcess, seconds: float) -> None:
    response = httpx.post(
        double.url + "/__double__/node_delay", json={"class_type": "ImageBlur", "seconds": seconds}
    )
    assert response.status_code == 200


def _kill_double_mid_prompt(stack: FaultStack, double: ServerProcess, task_id: str) -> None:
    stack.wait_for(task_id, lambda view: view["status"] == "PROCESSING", timeout_s=60, what="processing")
    wait_until(
        lambda: httpx.get(double.url + "/__double__/state").json().get("running") is not None,
        timeout_s=30,
        what="ComfyUI to run the prompt",
    )
    double.kill()


def _wait_for_comfyui_socket(stack: FaultStack) -> None:
    """Until the runner's ComfyUI client has its websocket back (it reconnects by itself).

    The main test waits so that it measures the retry path alone; the test below checks
    that a task arriving before the reconnect does not fail on a stale connection error."""

    def connected() -> bool:
        engines = httpx.get(stack.runner.url + "/api/status", timeout=10).json()["engines"]
        return bool(engines["comm"].get("websocket_connected"))

    wait_until(connected, timeout_s=30, interval_s=0.2, what="the runner's ComfyUI websocket")


@pytest.mark.parametrize(
    ("restart_wait_s", "outcome"),
    [("2", "FAILED"), ("120", "COMPLETED")],
    ids=["not-back-in-time-fails-with-reason", "held-until-comfyui-is-back"],
)
def test_comfyui_killed_mid_run_is_held_or_failed_and_the_runner_keeps_working(
    make_stack, comfyui, restart_wait_s, outcome
):
    # A crash holds the task up to COMFYUI_RESTART_WAIT_S (a real restart takes 12-40 s)
    # instead of spending its attempts; MAX_ATTEMPTS=1 shows no attempt is spent.
    first = comfyui()
    stack = make_stack(
        {
            "COMFYUI_URL": first.url,
            "RUNNER_ENVIRONMENTS": "comm",
            "MAX_ATTEMPTS": "1",
            "COMFYUI_RESTART_WAIT_S": restart_wait_s,
        }
    )
    _slow_nodes(first, 5.0)
    task_id = stack.create({"workflow": "custom", "task_data": {"wf_json": SLOW_GRAPH}})

    _kill_double_mid_prompt(stack, first, task_id)
    if outcome == "FAILED":
        view = stack.wait_terminal(task_id, timeout_s=90)
        comfyui()
    else:
        comfyui()
        view = stack.wait_terminal(task_id, timeout_s=90)

    task = view["task"]
    assert view["status"] == outcome, task["error"]
    if outcome == "FAILED":
        assert task["error"]["code"] == "comfyui_unavailable" and task["error"]["message"]
    else:
        assert task["attempts"] == 1
        assert len(task["output_data"]["outputs"]) == 1
    assert stack.runner.alive()
    _wait_for_comfyui_socket(stack)
    follow_up = stack.create({"workflow": "custom", "task_data": {"wf_json": SLOW_GRAPH}})
    after = stack.wait_terminal(follow_up, timeout_s=90)
    assert after["status"] == "COMPLETED", after["task"]["error"]


def _wait_for_reconnect_backoff_ceiling(port: int, *, gap_s: float = 4.0, timeout_s: float = 40.0) -> None:
    """Stand in ComfyUI's place on ``port`` and watch the runner's websocket reconnects
    arrive (each closed at once) until two come ``gap_s`` apart: the client's backoff has
    reached its 5 s ceiling, so the next task finds it asleep in a long wait."""
    listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
    listener.settimeout(0.2)
    attempts: list[float] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not (len(attempts) >= 2 and attempts[-1] - attempts[-2] >= gap_s):
            assert time.monotonic() < deadline, f"websocket reconnects seen at {attempts}"
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2.0)
                with contextlib.suppress(OSError):
                    if connection.recv(64).startswith(b"GET /ws"):
                        attempts.append(time.monotonic())
    finally:
        listener.close()


def test_task_right_after_comfyui_restart_completes_without_a_retry(make_stack, comfyui):
    first = comfyui()
    stack = make_stack({"COMFYUI_URL": first.url, "RUNNER_ENVIRONMENTS": "comm", "MAX_ATTEMPTS": "1"})
    _slow_nodes(first, 0.0)
    warm_up = stack.create({"workflow": "custom", "task_data": {"wf_json": SLOW_GRAPH}})
    assert stack.wait_terminal(warm_up, timeout_s=60)["status"] == "COMPLETED"
    first.kill()
    _wait_for_reconnect_backoff_ceiling(urlsplit(first.url).port or 0)
    comfyui()

    task_id = stack.create({"workflow": "custom", "task_data": {"wf_json": SLOW_GRAPH}})
    view = stack.wait_terminal(task_id, timeout_s=60)

    assert view["status"] == "COMPLETED", view["task"]["error"]
