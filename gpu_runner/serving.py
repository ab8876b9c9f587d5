"""The runner's HTTP server: uvicorn, minus its ten wake-ups a second.

uvicorn's main loop sleeps 0.1 s at a time to look at ``should_exit`` and to refresh its
cached ``Date`` header; on an idle runner that loop was most of the CPU the process used
(about 2.4 ms every second). :class:`QuietServer` (served by gpu_runner.supervisor.serve,
the runner's one entry point) sleeps until ``should_exit`` is set (by
SIGTERM/SIGINT through uvicorn's own handler, or by a caller) and sends no ``Date``
header (RFC 9110 lets an origin without a reliable clock omit it; nothing of ours reads it).
"""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

__all__ = ["QuietServer"]


class QuietServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        self._exit_requested = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._should_exit = False
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._exit_requested.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self.should_exit:
            await self._exit_requested.wait()
