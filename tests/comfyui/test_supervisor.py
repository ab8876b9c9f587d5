"""ManagedProcess supervising a real child: the ComfyUI double stands in for ComfyUI."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from gpu_runner.supervisor import ManagedProcess, ProcessState
from tests.comfyui.conftest import REPO
from tests.servers import free_port


def double_process(tmp_path: Path, **options: object) -> ManagedProcess:
    port = free_port()
    defaults: dict[str, object] = {
        "health_url": f"http://127.0.0.1:{port}/system_stats",
        "cwd": REPO,
        "log_path": tmp_path / "child.log",
        "ready_timeout_s": 20.0,
        "poll_interval_s": 0.1,
        "backoff_initial_s": 0.1,
        "stop_timeout_s": 5.0,
    }
    command = [
        sys.executable,
        "-m",
        "tests.fakes.comfyui_double",
        "--port",
        str(port),
        "--root",
        str(tmp_path / "r"),
    ]
    return ManagedProcess("comfyui", command, **{**defaults, **options})  # type: ignore[arg-type]


async def wait_for(predicate: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met")


def test_start_waits_for_readiness_and_stop_terminates(tmp_path):
    child = double_process(tmp_path)

    async def scenario() -> tuple[ProcessState, bool, int | None]:
        await child.start()
        ready_state, alive = child.state, child.alive()
        await child.stop()
        return ready_state, alive, child.last_exit_code

    state, alive, exit_code = asyncio.run(scenario())

    assert state == ProcessState.READY
    assert alive
    assert not child.alive()
    assert child.state == ProcessState.STOPPED
    assert exit_code is not None


def test_killed_child_is_restarted(tmp_path):
    child = double_process(tmp_path)

    async def scenario() -> tuple[int | None, int | None]:
        await child.start()
        supervisor = asyncio.create_task(child.supervise())
        first_pid = child.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        await wait_for(lambda: child.restarts == 1 and child.state == ProcessState.READY, 20)
        second_pid = child.pid
        await child.stop()
        await asyncio.wait_for(supervisor, 5)
        return first_pid, second_pid

    first_pid, second_pid = asyncio.run(scenario())

    assert second_pid != first_pid
    assert child.status()["restarts"] == 1
    assert child.last_exit_code is not None


def test_restarts_are_bounded_per_window(tmp_path):
    child = double_process(tmp_path, max_restarts=1, restart_window_s=60.0)

    async def scenario() -> None:
        await child.start()
        supervisor = asyncio.create_task(child.supervise())
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        await wait_for(lambda: child.restarts == 1 and child.state == ProcessState.READY, 20)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        await asyncio.wait_for(supervisor, 10)

    asyncio.run(scenario())

    assert child.state == ProcessState.FAILED
    assert child.restarts == 1
    assert not child.alive()


def test_child_that_exits_at_start_fails_fast(tmp_path):
    child = ManagedProcess(
        "broken",
        [sys.executable, "-c", "raise SystemExit(3)"],
        health_url="http://127.0.0.1:9/",
        ready_timeout_s=20,
    )
    started = time.monotonic()

    with pytest.raises(RuntimeError, match="exited with 3"):
        asyncio.run(child.start())

    assert time.monotonic() - started < 5
    assert child.state == ProcessState.FAILED


def test_child_that_never_answers_is_killed_after_the_bounded_wait(tmp_path):
    child = ManagedProcess(
        "silent",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        health_url=f"http://127.0.0.1:{free_port()}/",
        ready_timeout_s=0.5,
        stop_timeout_s=2.0,
    )

    with pytest.raises(RuntimeError, match="did not answer"):
        asyncio.run(child.start())

    assert not child.alive()
    assert child.state == ProcessState.FAILED
