"""`make run-emulated` keeps the emulators up and restarts the API or the runner when one
exits, saying so (issue 19 #7): a runner crash can be tried by hand without losing the
emulators' in-memory data. The real script runs as a subprocess on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from comfyswap.emulators import CLOUD_TASKS_EMULATOR_PYTHON, find_firestore_emulator, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.emulator, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _wait(what: str, check, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, (
            f"run-emulated exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        )
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise TimeoutError(f"{what} not after {timeout_s}s:\n{log.read_text()[-3000:]}")


def test_a_killed_runner_is_restarted_and_the_emulators_keep_their_data(tmp_path: Path) -> None:
    if find_firestore_emulator()[0] is None or not CLOUD_TASKS_EMULATOR_PYTHON.exists():
        pytest.skip("the Firestore or Cloud Tasks emulator is not installed")
    api_port, runner_port = free_port(), free_port()
    log = tmp_path / "run-emulated.out"
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS", "API_KEYS_FILE")}
    ports = ["--api-port", str(api_port), "--runner-port", str(runner_port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "scripts/run_emulated.py", *ports, "--data-dir", str(tmp_path / "data")],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60)
    runner_url = f"http://127.0.0.1:{runner_port}"
    try:
        _wait("the banner", lambda: "Try it:" in log.read_text(), process, log)
        task_id = api.post(
            "/api/tasks/create", json={"workflow": "default", "task_data": {"prompt": "x"}}
        ).json()["taskId"]
        runner_pid = int(
            httpx.get(runner_url + "/api/runner/status", timeout=10).json()["worker_id"].rsplit("-", 1)[1]
        )

        os.kill(runner_pid, signal.SIGKILL)

        _wait("the restart message", lambda: "restarting it" in log.read_text(), process, log)
        new_pid = _wait(
            "a new runner",
            lambda: int(
                httpx.get(runner_url + "/api/runner/status", timeout=5).json()["worker_id"].rsplit("-", 1)[1]
            ),
            process,
            log,
        )
        assert new_pid != runner_pid
        _wait("the up-again message", lambda: "the runner is up again" in log.read_text(), process, log)
        # The Firestore emulator stayed up: the task created before the crash is still there.
        assert api.get(f"/api/tasks/{task_id}").status_code == 200
    finally:
        api.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait(timeout=10)
    assert code == 0, log.read_text()[-3000:]
