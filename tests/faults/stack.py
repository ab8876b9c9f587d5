"""The embedded stack for fault tests: API and runner as subprocesses that a test can kill,
restart and read the logs of, and a loopback media server for task inputs.

Unlike tests/e2e's module-wide stack, every fault test starts its own stack (it breaks
it), with its own DATA_DIR, so one test's crash never leaks into another.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.servers import MediaServer, ServerProcess, free_port, start_server

__all__ = ["TERMINAL", "FaultStack", "MediaServer", "face_swap_body", "log_events", "running_stack"]

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
TaskView = dict[str, Any]


def log_events(log_text: str, event: str | None = None, task_id: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines of a process, optionally only one event and one task."""
    events: list[dict[str, Any]] = []
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if event is not None and entry.get("event") != event:
            continue
        if task_id is not None and entry.get("task_id") != task_id:
            continue
        events.append(entry)
    return events


class FaultStack:
    """The dev server (three functions) plus zero or more runner generations."""

    def __init__(self, tmp: Path, env: dict[str, str], *, runner_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.api_port = free_port()
        self.runner_port = free_port()
        self.env = {
            "DATA_DIR": str(self.data_dir),
            "API_PORT": str(self.api_port),
            "RUNNER_PORT": str(self.runner_port),
            "TASK_API_URL": f"http://127.0.0.1:{self.api_port}/api",
            "FETCH_ALLOW_LOOPBACK": "true",
            "RUNNER_ENVIRONMENTS": "face_swap",
            "LOG_LEVEL": "INFO",
            # Progress reaches the task within 0.2 s, so "N frames in" is seen mid-run even
            # on a quiet machine, where a clip swaps at ~65 frames/s (the default 2 s is
            # longer than the whole 120-frame clip there).
            "PROGRESS_INTERVAL_S": "0.2",
            **env,
        }
        self.runner_env = dict(runner_env or {})
        self.api = start_server(
            "api",
            [sys.executable, "-m", "comfyswap.cli", "api"],
            url=f"http://127.0.0.1:{self.api_port}",
            log_dir=tmp / "logs",
            env=self.env,
            health_path="/api/health",
            timeout_s=60,
        )
        self.runners: list[ServerProcess] = []
        self.client = httpx.Client(base_url=self.api.url, timeout=30.0)

    # --- processes --------------------------------------------------------------------
    def start_runner(self, extra_env: dict[str, str] | None = None) -> ServerProcess:
        """A new runner generation (its own log file and PID, hence its own worker id)."""
        runner = start_server(
            f"runner-{len(self.runners) + 1}",
            [sys.executable, "-m", "gpu_runner"],
            url=f"http://127.0.0.1:{self.runner_port}",
            log_dir=self.tmp / "logs",
            env={**self.env, **self.runner_env, **(extra_env or {})},
            health_path="/api/health",
            timeout_s=90,
        )
        self.runners.append(runner)
        return runner

    @property
    def runner(self) -> ServerProcess:
        return self.runners[-1]

    def sigterm_runner(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the current runner (its process only, as a container runtime does) and
        wait for it to exit; returns its exit code."""
        process = self.runner.process
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        return process.wait(timeout=timeout_s)

    def stop_runner_gracefully(self, timeout_s: float = 30.0) -> float:
        """SIGTERM the runner, check it exits cleanly, and return how long it took. (uvicorn
        re-raises the captured SIGTERM after a clean shutdown: -15 is a clean exit.)"""
        started = time.monotonic()
        exit_code = self.sigterm_runner(timeout_s=timeout_s)
        assert exit_code in (0, -signal.SIGTERM), self.runner_log()[-2000:]
        return time.monotonic() - started

    def video_mid_swap(self, media_server: MediaServer, frames: int, clip: str = "/long.mp4") -> str:
        """A long video task, once the engine has swapped ``frames`` frames of it."""
        task_id = self.create(face_swap_body(media_server, clip))
        self.wait_frames(task_id, frames=frames)
        return task_id

    def runner_log(self) -> str:
        return "\n".join(runner.log() for runner in self.runners)

    def runner_events(self, event: str, task_id: str | None = None) -> list[dict[str, Any]]:
        return log_events(self.runner_log(), event, task_id)

    def api_events(self, event: str, task_id: str | None = None) -> list[dict[str, Any]]:
        return log_events(self.api.log(), event, task_id)

    def close(self) -> None:
        self.client.close()
        for runner in self.runners:
            runner.stop()
        self.api.stop()

    # --- tasks ------------------------------------------------------------------------
    def create(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
        response = self.client.post("/api/tasks/create", json=body, headers=headers)
        assert response.status_code == 200, response.text
        task_id: str = response.json()["taskId"]
        return task_id

    def view(self, task_id: str) -> TaskView:
        response = self.client.get(f"/api/tasks/{task_id}")
        assert response.status_code == 200, response.text
        view: TaskView = response.json()
        return view

    def wait_for(
        self, task_id: str, predicate: Callable[[TaskView], bool], *, timeout_s: float, what: str
    ) -> TaskView:
        """Poll the task until ``predicate`` holds; fail with the runner log after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        view = self.view(task_id)
        while not predicate(view):
            if time.monotonic() > deadline:
                state = f"{view['status']} {view['task'].get('error')}"
                raise TimeoutError(
                    f"{task_id}: not {what} after {timeout_s}s: {state}\n{self.runner_log()[-3000:]}"
                )
            time.sleep(0.05)
            view = self.view(task_id)
        return view

    def wait_terminal(self, task_id: str, timeout_s: float = 90.0) -> TaskView:
        return self.wait_for(
            task_id, lambda view: view["status"] in TERMINAL, timeout_s=timeout_s, what="finished"
        )

    def wait_frames(self, task_id: str, frames: int, timeout_s: float = 60.0) -> TaskView:
        """Until the engine reports ``frames`` frames done: the task is mid-run."""

        def swapping(view: TaskView) -> bool:
            progress = view["task"].get("progress") or {}
            if view["status"] in TERMINAL:
                raise AssertionError(f"{task_id} ended before it was interrupted: {view['task']}")
            return bool(
                view["status"] == "PROCESSING"
                and progress.get("stage") == "frames"
                and progress["value"] >= frames
            )

        return self.wait_for(task_id, swapping, timeout_s=timeout_s, what=f"{frames} frames in")

    def result_files(self, task_id: str) -> list[Path]:
        """Every object the `local` storage provider holds for the task."""
        folder = self.data_dir / "results" / task_id
        return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else []


def face_swap_body(media_server: MediaServer, target: str = "/target.png") -> dict[str, Any]:
    """A face-swap create body: Grace Hopper's face into ``target`` (both from the media server)."""
    return {
        "workflow": "face_swap",
        "environment": "face_swap",
        "task_data": {
            "source_url": media_server.url + "/source.jpg",
            "target_url": media_server.url + target,
        },
    }


@contextlib.contextmanager
def running_stack(tmp: Path, env: dict[str, str]) -> Iterator[FaultStack]:
    """A stack with its runner up, closed (both processes stopped) when the block ends."""
    stack = FaultStack(tmp, env)
    try:
        stack.start_runner()
        yield stack
    finally:
        stack.close()
