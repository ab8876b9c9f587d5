"""The embedded stack as a user runs it: the dev server and the runner as subprocesses."""

from __future__ import annotations

import base64
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import MediaServer, ServerProcess, free_port, start_server

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}


class Stack:
    def __init__(self, api: ServerProcess, runner: ServerProcess, data_dir: Path) -> None:
        self.api = api
        self.runner = runner
        self.data_dir = data_dir
        self.client = httpx.Client(base_url=api.url, timeout=30.0)

    def close(self) -> None:
        """Stop the runner and the API (the stack's fixture does, at the end of its scope)."""
        self.client.close()
        self.runner.stop()
        self.api.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, body: dict[str, Any]) -> httpx.Response:
        return self.client.post("/api/tasks/create", json=body)

    def create_face_swap(self, source_url: str, target_url: str) -> httpx.Response:
        """A face_swap task: the face of ``source_url`` into ``target_url``."""
        return self.create(
            {"workflow": "face_swap", "task_data": {"source_url": source_url, "target_url": target_url}}
        )

    def wait(self, task_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            view: dict[str, Any] = self.client.get(f"/api/tasks/{task_id}").json()
            if view["status"] in TERMINAL:
                return view
            time.sleep(0.05)
        raise TimeoutError(f"{task_id} not finished after {timeout_s}s: {view}\n{self.runner.log()[-3000:]}")


def data_url(path: Path, content_type: str) -> str:
    """The file as a base64 ``data:`` URL (an input the API keeps in its input store)."""
    return f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def start_stack(tmp: Path, extra_env: dict[str, str] | None = None) -> Stack:
    api_port, runner_port = free_port(), free_port()
    env = {
        "DATA_DIR": str(tmp / "data"),
        "API_PORT": str(api_port),
        "RUNNER_PORT": str(runner_port),
        "TASK_API_URL": f"http://127.0.0.1:{api_port}/api",
        "FETCH_ALLOW_LOOPBACK": "true",
        "MAX_ATTEMPTS": "2",
        "LOG_LEVEL": "INFO",
        **(extra_env or {}),
    }
    api = start_server(
        "api",
        [sys.executable, "-m", "comfyswap.cli", "api"],
        url=f"http://127.0.0.1:{api_port}",
        log_dir=tmp / "logs",
        env=env,
        health_path="/api/health",
        timeout_s=60,
    )
    try:
        runner = start_server(
            "runner",
            [sys.executable, "-m", "gpu_runner"],
            url=f"http://127.0.0.1:{runner_port}",
            log_dir=tmp / "logs",
            env=env,
            health_path="/api/health",
            timeout_s=90,
        )
    except BaseException:
        api.stop()
        raise
    return Stack(api, runner, tmp / "data")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="module")
def media_server() -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """A real HTTP server on 127.0.0.1 serving whatever the test puts in its dict."""
    with MediaServer().running() as server:
        yield server.url, server.files
