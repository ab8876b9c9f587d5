"""The whole stack (dev API + runner subprocesses, `python -m gpu_runner`) against the real
ComfyUI: what issue 11 saw break only with the real server, end to end."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.comfyui.conftest import png_bytes
from tests.e2e.conftest import Stack, start_stack
from tests.peers.conftest import RealComfyUI
from tests.peers.test_comfyui_engine import blur_chain, fresh, invert_own_image, queue
from tests.servers import MediaServer, wait_until


def slow_chain(links: int) -> dict[str, Any]:
    """A blur chain slow enough on a quiet machine: at 512 px a blur takes ~50 ms there (20 of
    them end inside the runner's 2 s progress throttle, 100 inside a 30 s timeout); 1024 px
    with radius 16 is ~15x the work per node, still a few seconds at most on a busy one, so an
    interrupt (checked between nodes) lands well inside 5 s."""
    return blur_chain(links, size=1024, radius=16)


pytestmark = pytest.mark.real_peer("comfyui")

# Longer than any graph here but the timeout test's (100 blurs: 40 s on a quiet machine).
TASK_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def stack(real_comfyui: RealComfyUI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(
        tmp_path_factory.mktemp("peer-stack"),
        {
            "COMFYUI_URL": real_comfyui.url,
            "COMFYUI_INPUT_DIR": str(real_comfyui.input_dir),
            "RUNNER_ENVIRONMENTS": "comm",
            "TASK_TIMEOUT_S": str(TASK_TIMEOUT_S),
            "MAX_ATTEMPTS": "1",
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def media() -> Iterator[MediaServer]:
    with MediaServer().running() as server:
        yield server


def create(stack: Stack, body: dict[str, Any]) -> str:
    response = stack.create(body)
    assert response.status_code == 200, response.text
    return str(response.json()["taskId"])


def test_text_only_graph_completes_with_its_text(stack, comfyui_idle):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 30, "batch_size": 1, "color": 1}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    task_id = create(stack, {"workflow": "custom", "task_data": {"wf_json": fresh(graph)}})

    view = stack.wait(task_id, timeout_s=120)

    assert view["status"] == "COMPLETED", view["task"].get("error")
    [output] = view["task"]["output_data"]["outputs"]
    assert (output["kind"], output["content_type"], output["node_id"]) == ("text", "text/plain", "3")
    assert stack.client.get(output["url"]).text == "40"


def test_each_output_keeps_its_storage_key(stack, comfyui_idle):
    task_id = create(stack, {"workflow": "custom", "task_data": {"wf_json": blur_chain(1, size=64)}})

    view = stack.wait(task_id, timeout_s=120)

    assert view["status"] == "COMPLETED", view["task"].get("error")
    [output] = view["task"]["output_data"]["outputs"]
    assert output["key"] == f"results/{task_id}/000.png"
    assert output["output_key"] == "images"
    assert stack.client.get(output["url"]).status_code == 200


def test_custom_graph_input_image_is_fetched_used_and_removed_from_comfyui(stack, comfyui_idle, media):
    url = media.add(f"/{uuid.uuid4().hex}.png", "image/png", png_bytes(30, 20, (200, 100, 0)))
    task_id = create(stack, {"workflow": "custom", "task_data": invert_own_image(url)})

    view = stack.wait(task_id, timeout_s=120)

    assert view["status"] == "COMPLETED", view["task"].get("error")
    assert view["task"]["output_data"]["outputs"][0]["width"] == 30
    uploads = comfyui_idle.input_dir / "comfyswap"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def test_progress_reaches_the_task_during_a_real_graph(stack, comfyui_idle):
    task_id = create(stack, {"workflow": "custom", "task_data": {"wf_json": slow_chain(20)}})
    seen: list[dict[str, Any]] = []

    def mid_graph_progress() -> bool:
        task = stack.client.get(f"/api/tasks/{task_id}").json()["task"]
        progress = task.get("progress") or {}
        if progress:
            seen.append(progress)
        return "ImageBlur" in progress.get("stage", "") and 0 < progress["value"] < progress["max"]

    wait_until(mid_graph_progress, timeout_s=120, interval_s=0.1, what="progress mid-graph")
    view = stack.wait(task_id, timeout_s=180)

    assert view["status"] == "COMPLETED", view["task"].get("error")
    assert seen[-1]["max"] == 22


def test_cli_progress_bar_shows_the_running_node(stack, comfyui_idle, tmp_path):
    workflow = tmp_path / "chain.json"
    workflow.write_text(json.dumps(slow_chain(20)))
    command = [sys.executable, "-m", "comfyswap.cli", "--api-url", stack.api.url]
    command += ["submit", str(workflow), "--wait", "--timeout", "180"]
    # A terminal, as a user sees it: the bar is drawn only on one.
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        command, stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "160"}
    )
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 200
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                screen += chunk
            elif process.poll() is not None:
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        os.close(leader)

    text = screen.decode(errors="replace")
    assert process.returncode == 0, text[-2000:]
    assert "PROCESSING node " in text and "ImageBlur" in text, text[-2000:]


def test_task_timeout_interrupts_comfyui_and_leaves_its_queue_empty(stack, comfyui_idle):
    task_id = create(stack, {"workflow": "custom", "task_data": {"wf_json": slow_chain(100)}})

    view = stack.wait(task_id, timeout_s=TASK_TIMEOUT_S + 90)
    ended = time.monotonic()

    assert view["status"] == "FAILED"
    assert view["task"]["error"]["code"] in ("task_timeout", "comfyui_timeout"), view["task"]["error"]
    wait_until(
        lambda: queue(comfyui_idle) == {"queue_running": [], "queue_pending": []},
        timeout_s=5,
        interval_s=0.1,
        what="ComfyUI's queue to be empty after the timeout",
    )
    assert time.monotonic() - ended < 5.5


def test_interrupt_route_answers_json_and_a_wrong_method_json_405(stack, comfyui_idle):
    runner = httpx.Client(base_url=stack.runner.url, timeout=30)
    try:
        interrupted = runner.post("/api/comfyui-interrupt")
        wrong = runner.get("/api/comfyui-interrupt")
        status = runner.get("/api/comfyui-queue-status")
    finally:
        runner.close()

    assert interrupted.status_code == 200
    assert interrupted.headers["content-type"].startswith("application/json")
    assert interrupted.json() == {"interrupted": True, "prompt_id": None}
    assert wrong.status_code == 405
    assert wrong.headers["content-type"].startswith("application/json")
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert status.json()["queue_remaining"] == 0
