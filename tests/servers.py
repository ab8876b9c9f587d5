"""Start real servers for tests: a free loopback port, a subprocess, a bounded wait.

The launcher itself is comfyswap.emulators.start_process (the one `make run-emulated`
uses): every server is bound to 127.0.0.1, writes its output to a file (never an unread
pipe: the Firestore emulator stalls once a pipe fills) and is stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from comfyswap.emulators import EmulatorProcess, free_port, start_process

__all__ = ["ServerProcess", "free_port", "running", "start_server", "wait_until"]

ServerProcess = EmulatorProcess
start_server = start_process


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.05, what: str = ""
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout_s`` (never wait forever)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what or predicate}")


@contextlib.contextmanager
def running(*args: Any, **kwargs: Any) -> Iterator[EmulatorProcess]:
    server = start_server(*args, **kwargs)
    try:
        yield server
    finally:
        server.stop()
