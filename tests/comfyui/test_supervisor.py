"""ManagedProcess supervising a real child: the ComfyUI double stands in for ComfyUI."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gpu_runner.supervisor import ManagedProcess, PortTaken, ProcessState
from tests.comfyui.conftest import REPO, start_double
from tests.fakes.comfyui_double import command as double_command
from tests.servers import free_port, start_server, wait_until


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
    return ManagedProcess("comfyui", double_command(port, tmp_path / "r"), **{**defaults, **options})  # type: ignore[arg-type]


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


def test_a_process_already_on_the_port_is_refused_not_reported_ready(tmp_path):
    # An orphan from an earlier run answers the health URL: the child would crash-loop on
    # "address in use" while the supervisor reported ready against the orphan.
    orphan = start_double(tmp_path, "orphan")
    port = int(orphan.url.rsplit(":", 1)[1])
    child = ManagedProcess(
        "comfyui",
        double_command(port, tmp_path / "r"),
        health_url=f"{orphan.url}/system_stats",
        cwd=REPO,
        ready_timeout_s=20.0,
    )
    try:
        with pytest.raises(PortTaken, match="already answers"):
            asyncio.run(child.start())
    finally:
        orphan.stop()

    assert child.state == ProcessState.FAILED
    assert child.process is None


def test_a_killed_supervisor_takes_its_child_with_it(tmp_path):
    # PR_SET_PDEATHSIG: even a SIGKILLed runner (no stop() ran) leaves no child on the port.
    port = free_port()
    script = (
        "import asyncio, sys, time\n"
        "from gpu_runner.supervisor import ManagedProcess\n"
        f"child = ManagedProcess('c', {double_command(port, tmp_path / 'r')!r}, "
        f"health_url='http://127.0.0.1:{port}/system_stats', ready_timeout_s=30)\n"
        "asyncio.run(child.start())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout is not None
        child_pid = int(runner.stdout.readline())
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child_pid):
            time.sleep(0.05)
        assert not _alive(child_pid)
    finally:
        if runner.poll() is None:
            runner.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for its reaper is gone for us
        return stat.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_runner_entry_point_stops_its_comfyui_on_a_signal(tmp_path, stop_signal):
    # `python -m gpu_runner` (what the container, `comfyswap run` and the tests start) with
    # COMFYUI_COMMAND: a signal stops uvicorn, then the child; nothing is left on its port.
    # (The real ComfyUI does the same in tests/peers/test_comfyui_supervised.py.)
    runner_port, comfyui_port = free_port(), free_port()
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "RUNNER_PORT": str(runner_port),
        "RUNNER_ENVIRONMENTS": "comm",
        "TASK_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "COMFYUI_URL": f"http://127.0.0.1:{comfyui_port}",
        "COMFYUI_COMMAND": shlex.join(double_command(comfyui_port, tmp_path / "r")),
    }
    runner = start_server(
        "runner",
        [sys.executable, "-m", "gpu_runner"],
        url=f"http://127.0.0.1:{runner_port}",
        health_path="/api/health",
        log_dir=tmp_path,
        env=env,
        cwd=REPO,
        timeout_s=120,
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{comfyui_port}/system_stats", timeout=1).status_code == 200,
            timeout_s=60,
            what="the supervised ComfyUI double",
        )

        runner.process.send_signal(stop_signal)
        runner.process.wait(timeout=60)

        for port in (comfyui_port, runner_port):
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    finally:
        runner.kill()
