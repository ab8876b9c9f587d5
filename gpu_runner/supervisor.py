"""Supervise the engines that run next to the runner (ComfyUI, FaceFusion) as child processes.

DESIGN.md §5: the runner starts in seconds and supervises its co-located engines with a
bounded wait and liveness by PID. A ``ManagedProcess``:

* starts the child in its own process group (so a stop reaches its workers too), with
  its output appended to a log file, never an unread pipe (a full pipe stalls the child);
* waits for readiness by polling a health URL, bounded in time, and gives up early if
  the child exits meanwhile;
* checks liveness by PID (``Popen.poll``), cheap enough to run every half second;
* restarts a crashed child with exponential backoff, at most ``max_restarts`` times per
  ``restart_window_s`` (a child that crashes in a loop is left ``failed``, and the
  engine reports unavailable, instead of burning the GPU box);
* stops with SIGTERM, then SIGKILL after ``stop_timeout_s``.

``python -m gpu_runner.supervisor`` starts the configured children (COMFYUI_COMMAND),
then serves the runner (``gpu_runner.app:create_app``) with uvicorn; the children get
ready in the background, so the runner answers health checks at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import importlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from shared.logs import get_logger, log_event

__all__ = ["ManagedProcess", "ProcessState", "main"]

logger = get_logger(__name__)


class ProcessState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"  # too many crashes in the window, or never became ready


class ManagedProcess:
    """One supervised child process. Use ``start()`` then ``supervise()`` (a task), ``stop()``."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        health_url: str | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = 120.0,
        poll_interval_s: float = 0.5,
        max_restarts: int = 5,
        restart_window_s: float = 300.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        if not command:
            raise ValueError(f"{name}: empty command")
        self.name = name
        self.command = list(command)
        self.health_url = health_url
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.state = ProcessState.STOPPED
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.last_exit_code: int | None = None
        self._restart_times: collections.deque[float] = collections.deque()
        self._stopping = False

    # --- status --------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        """Liveness by PID: the child has not exited (``poll()`` reaps it if it has)."""
        if self.process is None:
            return False
        code = self.process.poll()
        if code is not None:
            self.last_exit_code = code
            return False
        return True

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid if self.alive() else None,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,
        }

    # --- lifecycle -------------------------------------------------------------------------
    def _spawn(self) -> None:
        log_file = self.log_path.open("ab") if self.log_path is not None else None
        try:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env={**os.environ, **self.env} if self.env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log_file if log_file is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        log_event(logger, "child_started", child=self.name, pid=self.process.pid)

    async def start(self) -> None:
        """Spawn and wait (bounded) until ready; raises ``RuntimeError`` if it never gets there."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self.state = ProcessState.STARTING
        self._spawn()
        if await self.wait_ready(self.ready_timeout_s):
            self.state = ProcessState.READY
            return
        self.state = ProcessState.FAILED
        reason = f"exited with {self.last_exit_code}" if not self.alive() else "did not answer its health URL"
        await self._terminate()
        raise RuntimeError(f"{self.name} {reason} within {self.ready_timeout_s:g}s")

    async def wait_ready(self, timeout_s: float) -> bool:
        """Poll the health URL until it answers < 500; False on timeout or if the child exits."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    return False
                if self.health_url is None:
                    return True
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(self.health_url)
                    if response.status_code < 500:
                        return True
                await asyncio.sleep(min(self.poll_interval_s, 0.2))
        return False

    async def supervise(self) -> None:
        """Watch the PID; restart after a crash with backoff, within the restart budget."""
        backoff = self.backoff_initial_s
        while not self._stopping:
            await asyncio.sleep(self.poll_interval_s)
            if self._stopping or self.state == ProcessState.FAILED:
                return
            if self.alive():
                if self.state == ProcessState.READY:
                    backoff = self.backoff_initial_s
                continue
            log_event(
                logger, "child_exited", level=logging.WARNING, child=self.name, exit_code=self.last_exit_code
            )
            now = time.monotonic()
            while self._restart_times and now - self._restart_times[0] > self.restart_window_s:
                self._restart_times.popleft()
            if len(self._restart_times) >= self.max_restarts:
                self.state = ProcessState.FAILED
                log_event(
                    logger,
                    "child_failed",
                    level=logging.ERROR,
                    child=self.name,
                    restarts=len(self._restart_times),
                    window_s=self.restart_window_s,
                )
                return
            self.state = ProcessState.RESTARTING
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)
            if self._stopping:
                return
            self._restart_times.append(time.monotonic())
            self.restarts += 1
            self._spawn()
            if await self.wait_ready(self.ready_timeout_s):
                self.state = ProcessState.READY
            elif self.alive():  # hung, not crashed: kill it, the next round restarts it
                await self._terminate()

    async def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after ``stop_timeout_s``."""
        self._stopping = True
        await self._terminate()
        self.state = ProcessState.STOPPED

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            while process.poll() is None:
                await asyncio.sleep(0.02)
        self.last_exit_code = process.returncode
        log_event(logger, "child_stopped", child=self.name, exit_code=process.returncode)


def comfyui_process(command: str, comfyui_url: str, log_dir: Path) -> ManagedProcess:
    """The ManagedProcess for COMFYUI_COMMAND, ready when COMFYUI_URL/system_stats answers."""
    return ManagedProcess(
        "comfyui",
        shlex.split(command),
        health_url=comfyui_url.rstrip("/") + "/system_stats",
        log_path=log_dir / "comfyui.log",
    )


async def _serve(children: list[ManagedProcess]) -> None:
    import uvicorn  # lazily: the module is importable (and testable) without the server stack

    from shared.settings import get_settings

    settings = get_settings()
    # By name: the runner app is another module's business; this one stays importable alone.
    create_app = importlib.import_module("gpu_runner.app").create_app
    app = create_app(settings)
    state = getattr(app, "state", None)
    if state is not None:
        state.managed_processes = {child.name: child for child in children}
    tasks: list[asyncio.Task[None]] = []

    async def start_and_supervise(child: ManagedProcess) -> None:
        try:
            await child.start()
        except RuntimeError as exc:
            log_event(logger, "child_start_failed", level=logging.ERROR, child=child.name, error=str(exc))
        await child.supervise()

    for child in children:
        tasks.append(asyncio.create_task(start_and_supervise(child), name=f"supervise-{child.name}"))
    config = uvicorn.Config(app, host=settings.runner_host, port=settings.runner_port, log_config=None)
    try:
        await uvicorn.Server(config).serve()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(child.stop() for child in children), return_exceptions=True)


def main() -> None:
    """Start the configured children, then serve the runner until SIGTERM/SIGINT."""
    from shared.logs import configure_logging
    from shared.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level)
    children: list[ManagedProcess] = []
    if settings.comfyui_command.strip():
        comfyui_url = settings.comfyui_url or "http://127.0.0.1:8188"
        children.append(comfyui_process(settings.comfyui_command, comfyui_url, settings.data_dir / "logs"))
    asyncio.run(_serve(children))


if __name__ == "__main__":
    main()
