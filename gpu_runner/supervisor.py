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

``main`` is the runner's one entry point: ``python -m gpu_runner`` (the container, ``comfyswap
run`` / ``make run``, the tests) and the benchmarks (``serve`` with their engine) all start
here. It starts the configured children (COMFYUI_COMMAND), then serves the runner
(``gpu_runner.app:create_app``) with uvicorn; the children get ready in the background, so
the runner answers health checks at once. SIGTERM/SIGINT stop uvicorn gracefully, then every
child's process group; a child also gets SIGKILL from the kernel if the runner dies without
a stop (PR_SET_PDEATHSIG), so no ComfyUI is ever left holding its port.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import enum
import importlib
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn

from gpu_runner.serving import QuietServer
from shared.logs import get_logger, log_event
from shared.settings import Settings

__all__ = ["ManagedProcess", "PortTaken", "ProcessState", "main", "serve"]

logger = get_logger(__name__)


class PortTaken(RuntimeError):
    """The child's port already answers before the child is started."""


_PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the forked child
    _LIBC: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # not Linux/glibc: children are still stopped by ``stop()``
    _LIBC = None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the runner dies (Linux), so a runner killed
    without a stop (SIGKILL, a crash) leaves no orphaned ComfyUI on the port."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"  # too many crashes in the window, or never became ready


@dataclasses.dataclass(eq=False, repr=False)
class ManagedProcess:
    """One supervised child process. Use ``start()`` then ``supervise()`` (a task), ``stop()``."""

    name: str
    command: Sequence[str]
    _: dataclasses.KW_ONLY
    health_url: str | None = None
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    log_path: Path | None = None
    ready_timeout_s: float = 120.0
    poll_interval_s: float = 0.5
    max_restarts: int = 5
    restart_window_s: float = 300.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    stop_timeout_s: float = 10.0
    state: ProcessState = dataclasses.field(default=ProcessState.STOPPED, init=False)
    process: subprocess.Popen[bytes] | None = dataclasses.field(default=None, init=False)
    restarts: int = dataclasses.field(default=0, init=False)
    last_exit_code: int | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(f"{self.name}: empty command")
        self.command = list(self.command)
        self.env = dict(self.env) if self.env is not None else None
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
    def port_taken(self) -> bool:
        """Something already answers on the health URL's port: an orphan from an earlier run,
        or another program. Starting then would crash-loop on "address in use" while the
        health URL answers for the other process."""
        if self.health_url is None:
            return False
        parts = urlsplit(self.health_url)
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=1.0):
                return True
        except OSError:
            return False

    def _spawn(self) -> None:
        if self.port_taken():
            raise PortTaken(
                f"{self.name}: {self.health_url} already answers before the child started: another "
                "process (an orphaned child of an earlier run?) holds the port; stop it first"
            )
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
                preexec_fn=_die_with_parent,  # only prctl, before exec
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
        try:
            self._spawn()
        except PortTaken:
            self.state = ProcessState.FAILED
            raise
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
            try:
                self._spawn()
            except PortTaken as exc:  # counts as a failed restart; the budget bounds it
                log_event(logger, "child_port_taken", level=logging.ERROR, child=self.name, error=str(exc))
                continue
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
        # Stopped after the runner drained: nothing of ComfyUI's is worth waiting for then.
        stop_timeout_s=3.0,
    )


def configured_children(settings: Settings) -> list[ManagedProcess]:
    if not settings.comfyui_command.strip():
        return []
    comfyui_url = settings.comfyui_url or "http://127.0.0.1:8188"
    return [comfyui_process(settings.comfyui_command, comfyui_url, settings.data_dir / "logs")]


class _Server(QuietServer):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, with the handlers it found
    (SIG_DFL: the process dies there). ``serve`` must still stop the children after it, so
    the signal is only recorded, never re-raised."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


async def serve(
    settings: Settings, *, children: list[ManagedProcess] | None = None, state: Any = None
) -> None:
    """Serve the runner until SIGTERM/SIGINT, supervising ``children`` (default: the configured
    ones); on the way out every child is stopped, whatever ended the server."""
    # By name: the runner app is another module's business; this one stays importable alone.
    create_app = importlib.import_module("gpu_runner.app").create_app
    app = create_app(settings) if state is None else create_app(settings, state=state)
    children = configured_children(settings) if children is None else children
    app_state = getattr(app, "state", None)
    if app_state is not None:
        app_state.managed_processes = {child.name: child for child in children}
    tasks: list[asyncio.Task[None]] = []

    async def start_and_supervise(child: ManagedProcess) -> None:
        try:
            await child.start()
        except RuntimeError as exc:
            log_event(logger, "child_start_failed", level=logging.ERROR, child=child.name, error=str(exc))
            return
        await child.supervise()

    try:
        for child in children:
            tasks.append(asyncio.create_task(start_and_supervise(child), name=f"supervise-{child.name}"))
        config = uvicorn.Config(
            app,
            host=settings.runner_host,
            port=settings.runner_port,
            log_config=None,
            log_level="warning",
            access_log=False,
            date_header=False,  # QuietServer: no per-second Date refresh on an idle runner
            # The whole SIGTERM exit (drain, then the children) must fit Cloud Run's 10 s.
            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        )
        await _Server(config).serve()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(child.stop() for child in children), return_exceptions=True)


def main() -> None:
    """The runner's entry point: start the configured children, serve until SIGTERM/SIGINT."""
    from shared.logs import configure_logging
    from shared.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
