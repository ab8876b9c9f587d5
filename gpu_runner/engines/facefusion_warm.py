"""Warm FaceFusion hosts: one long-lived FaceFusion process per engine slot, fed jobs over a
pipe (facefusion_host.py runs inside FaceFusion's venv), so a job no longer pays Python's
start, FaceFusion's imports, its model hash checks and ONNX session creation.

A host is started on a slot's first job, answers one job at a time, and is replaced when
it dies, when a job is cancelled or times out (its whole process group is killed, as a
per-job ``headless-run`` would be), or when it grows past
``FACEFUSION_WARM_MAX_RSS_MB`` (a leak must not take the runner down). A host that cannot
start (FaceFusion missing, its pre-check failing) makes the engine fall back to one
``headless-run`` per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from gpu_runner.engines.facefusion_cli import FaceFusionProgressParser
from shared.errors import UpstreamUnavailable
from shared.logs import get_logger, log_event

__all__ = ["HOST_SCRIPT", "HostResult", "WarmHost", "WarmHostPool"]

_logger = get_logger(__name__)
HOST_SCRIPT: Final = Path(__file__).with_name("facefusion_host.py")
_READY_TIMEOUT_S: Final = 300.0
_READ_CHUNK_BYTES: Final = 4096
_PROTOCOL_LIMIT_BYTES: Final = 1024 * 1024

HostResult = dict[str, Any]


class WarmHost:
    """One FaceFusion host process (its own process group)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.parser: FaceFusionProgressParser | None = None
        self._stderr_reader = asyncio.ensure_future(self._read_stderr())

    @classmethod
    async def start(
        cls, python: str, root: Path, environment: dict[str, str], warm_up: Sequence[str]
    ) -> WarmHost:
        try:
            process = await asyncio.create_subprocess_exec(
                python,
                str(HOST_SCRIPT),
                "--root",
                str(root),
                "--warm-up",
                json.dumps(list(warm_up)),
                cwd=root,
                env=environment,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                limit=_PROTOCOL_LIMIT_BYTES,
            )
        except OSError as exc:
            raise UpstreamUnavailable(
                f"the warm FaceFusion could not be started: {exc}", code="facefusion_unavailable"
            ) from exc
        host = cls(process)
        tail = FaceFusionProgressParser(lambda _progress: None)
        host.parser = tail
        try:
            ready = await asyncio.wait_for(host._read_message(), timeout=_READY_TIMEOUT_S)
        except BaseException as exc:
            host.kill()  # never leave a half-started host behind (a cancelled start too)
            if not isinstance(exc, (TimeoutError, UpstreamUnavailable)):
                raise
            last_lines = " | ".join(list(tail.tail)[-5:])
            raise UpstreamUnavailable(
                f"the warm FaceFusion did not start: {exc}; its last lines: {last_lines}",
                code="facefusion_unavailable",
            ) from exc
        if ready.get("event") != "ready":
            host.kill()
            raise UpstreamUnavailable(
                f"the warm FaceFusion did not start: {ready.get('reason', ready)}",
                code="facefusion_unavailable",
            )
        host.parser = None
        log_event(_logger, "facefusion_host_ready", pid=process.pid, rss_mb=ready.get("rss_mb"))
        return host

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def run(self, argv: Sequence[str], parser: FaceFusionProgressParser) -> HostResult:
        """Send one job and wait for its answer; FaceFusion's stderr goes to ``parser``."""
        assert self.process.stdin is not None
        self.parser = parser
        try:
            self.process.stdin.write((json.dumps({"argv": list(argv)}) + "\n").encode())
            await self.process.stdin.drain()
            return await self._read_message()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise UpstreamUnavailable(
                f"the warm FaceFusion died: {exc}", code="facefusion_unavailable", retryable=True
            ) from exc
        finally:
            self.parser = None

    async def _read_message(self) -> HostResult:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            await self.process.wait()
            raise UpstreamUnavailable(
                f"the warm FaceFusion exited (code {self.process.returncode})", code="facefusion_unavailable"
            )
        message: HostResult = json.loads(line)
        return message

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(_READ_CHUNK_BYTES):
            if self.parser is not None:
                self.parser.feed(chunk.decode("utf-8", errors="replace"))

    def kill(self) -> None:
        """SIGKILL the host's whole process group (its ffmpeg children too)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            log_event(_logger, "facefusion_host_killed", pid=self.process.pid)

    async def close(self) -> None:
        self.kill()
        with contextlib.suppress(ProcessLookupError):
            await self.process.wait()
        self._stderr_reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_reader


class WarmHostPool:
    """Idle hosts, at most ``size`` of them alive (one per engine slot)."""

    def __init__(self, size: int, max_rss_mb: float) -> None:
        self.size = size
        self.max_rss_mb = max_rss_mb
        self._idle: list[WarmHost] = []
        self._alive = 0
        self._lock = asyncio.Lock()

    async def acquire(
        self, python: str, root: Path, environment: dict[str, str], warm_up: Sequence[str]
    ) -> WarmHost:
        async with self._lock:
            while self._idle:
                host = self._idle.pop()
                if host.alive:
                    return host
                self._alive -= 1
            self._alive += 1
        try:
            return await WarmHost.start(python, root, environment, warm_up)
        except BaseException:
            self._alive -= 1
            raise

    async def release(self, host: WarmHost, result: HostResult | None) -> None:
        """Back to the pool, or closed (dead, interrupted, or grown past the RSS limit)."""
        too_big = result is not None and float(result.get("rss_mb") or 0) > self.max_rss_mb
        if result is None or too_big or not host.alive:
            if too_big:
                log_event(
                    _logger,
                    "facefusion_host_recycled",
                    pid=host.process.pid,
                    rss_mb=result and result["rss_mb"],
                )
            await host.close()
            self._alive -= 1
            return
        self._idle.append(host)

    async def close(self) -> None:
        hosts, self._idle = self._idle, []
        for host in hosts:
            await host.close()
            self._alive -= 1
