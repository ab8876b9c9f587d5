"""`comfyswap run` (what `make run` runs) with COMFYUI_COMMAND starting the real ComfyUI:
the runner's supervisor launches it, holds tasks through a real crash and restart
(12-40 s), and leaves no process behind when it is stopped.

The tests run in file order on one `comfyswap run`: the last one stops it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.comfyui.conftest import png_bytes
from tests.peers import comfyui_peer
from tests.peers.conftest import require_peer
from tests.peers.test_comfyui_engine import blur_chain, invert_own_image
from tests.servers import MediaServer, free_port, wait_until

pytestmark = pytest.mark.real_peer("comfyui")


class Run:
    def __init__(
        self, process: subprocess.Popen[bytes], base_dir: Path, log: Path, ports: dict[str, int]
    ) -> None:
        self.process = process
        self.base_dir = base_dir
        self.log = log
        self.ports = ports
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{ports['api']}", timeout=30)
        self.comfyui_url = f"http://127.0.0.1:{ports['comfyui']}"

    def comfyui_processes(self) -> list[psutil.Process]:
        """Every ComfyUI started for this run (found by its own base directory)."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if str(self.base_dir) in cmdline and any(part.endswith("main.py") for part in cmdline):
                found.append(process)
        return found

    def comfyui_ready(self) -> bool:
        return httpx.get(self.comfyui_url + "/system_stats", timeout=2).status_code == 200

    def wait(self, task_id: str, timeout_s: float) -> dict[str, Any]:
        view: dict[str, Any] = {}

        def ended() -> bool:
            nonlocal view
            view = self.api.get(f"/api/tasks/{task_id}").json()
            return view["status"] in ("COMPLETED", "FAILED", "CANCELLED")

        wait_until(ended, timeout_s=timeout_s, interval_s=0.2, what=f"task {task_id} to end")
        return view

    def log_events(self, event: str) -> list[dict[str, Any]]:
        events = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    require_peer(comfyui_peer.installed(), comfyui_peer.missing_reason())
    tmp = tmp_path_factory.mktemp("comfyswap-run")
    base_dir = tmp / "comfyui"
    ports = {"api": free_port(), "runner": free_port(), "comfyui": free_port()}
    env = {
        **__import__("os").environ,
        "DATA_DIR": str(tmp / "data"),
        "API_PORT": str(ports["api"]),
        "RUNNER_PORT": str(ports["runner"]),
        "COMFYUI_URL": f"http://127.0.0.1:{ports['comfyui']}",
        "COMFYUI_COMMAND": comfyui_peer.comfyui_command_line(base_dir, ports["comfyui"]),
        "FETCH_ALLOW_LOOPBACK": "true",
        "RUNNER_ENVIRONMENTS": "comm",
        "MAX_ATTEMPTS": "1",
        "LOG_LEVEL": "INFO",
    }
    log = tmp / "comfyswap-run.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "comfyswap.cli", "run"],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    running = Run(process, base_dir, log, ports)
    try:
        wait_until(
            running.comfyui_ready, timeout_s=comfyui_peer.READY_TIMEOUT_S, what="the supervised ComfyUI"
        )
        wait_until(lambda: running.api.get("/api/health").status_code == 200, timeout_s=60, what="the API")
        yield running
    finally:
        running.api.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        for leftover in running.comfyui_processes():  # never leave one behind, even on failure
            leftover.kill()


def test_make_run_starts_the_real_comfyui_and_runs_a_task_on_it(run):
    assert len(run.comfyui_processes()) == 1
    with MediaServer().running() as media:
        url = media.add("/in.png", "image/png", png_bytes(24, 16, (1, 2, 3)))
        created = run.api.post(
            "/api/tasks/create",
            json={"workflow": "custom", "task_data": invert_own_image(url, prefix="run")},
        )
        assert created.status_code == 200, created.text

        view = run.wait(created.json()["taskId"], timeout_s=120)

    assert view["status"] == "COMPLETED", view["task"].get("error")
    # COMFYUI_INPUT_DIR is not set: the folder comes from COMFYUI_COMMAND (--base-directory).
    uploads = run.base_dir / "input" / "comfyswap"
    assert uploads.is_dir() and list(uploads.iterdir()) == []


def test_comfyui_crash_holds_the_task_until_it_is_back_without_spending_an_attempt(run):
    earlier = run.api.post(
        "/api/tasks/create", json={"workflow": "custom", "task_data": {"wf_json": blur_chain(1, size=72)}}
    ).json()["taskId"]
    assert run.wait(earlier, timeout_s=120)["status"] == "COMPLETED"
    created = run.api.post(
        "/api/tasks/create", json={"workflow": "custom", "task_data": {"wf_json": blur_chain(60)}}
    )
    task_id = created.json()["taskId"]
    wait_until(
        lambda: httpx.get(run.comfyui_url + "/queue", timeout=5).json()["queue_running"],
        timeout_s=120,
        interval_s=0.1,
        what="ComfyUI to run the prompt",
    )
    [crashed] = run.comfyui_processes()

    crashed.kill()  # a crash, not a stop: the supervisor restarts it (12-40 s)
    view = run.wait(task_id, timeout_s=300)

    task = view["task"]
    assert view["status"] == "COMPLETED", task.get("error")
    assert task["attempts"] == 1 and not task.get("attempt_history")  # MAX_ATTEMPTS=1: held, not retried
    [restarted] = run.comfyui_processes()
    assert restarted.pid != crashed.pid
    # The websocket's own log lines (it outlives every task) carry no task's id.
    dropped = run.log_events("comfyui_socket_dropped")
    assert dropped, "the runner saw its ComfyUI socket drop"
    assert all(event.get("task_id") in (None, "") for event in dropped), dropped
    assert run.log_events("comfyui_task_held")


def test_stopping_make_run_leaves_no_comfyui_process_and_frees_the_port(run):
    comfyui = run.comfyui_processes()
    assert comfyui

    run.process.send_signal(signal.SIGTERM)
    run.process.wait(timeout=90)

    assert run.comfyui_processes() == []
    assert not any(process.is_running() and process.status() != psutil.STATUS_ZOMBIE for process in comfyui)
    for name, port in run.ports.items():
        assert port_free(port), f"{name} port {port} still answers"
