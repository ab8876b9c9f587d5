"""Start real servers for tests: a free loopback port, a subprocess, a bounded wait.

Every server is bound to 127.0.0.1, writes its output to a file (never an unread pipe:
the Firestore emulator stalls once a pipe fills) and is stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port", "start_server", "wait_until"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class ServerProcess:
    def __init__(self, name: str, process: subprocess.Popen[bytes], log_path: Path, url: str) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.url = url

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def start_server(
    name: str,
    command: Sequence[str],
    *,
    url: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
    health_path: str = "/",
    timeout_s: float = 60.0,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start ``command`` in its own process group and wait until it answers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        list(command),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )
    log_file.close()
    server = ServerProcess(name, process, log_path, url)

    def answered() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log()[-4000:]}")
        if ready is not None:
            return ready()
        httpx.get(url + health_path, timeout=1.0)
        return True

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if answered():
                    break
            except RuntimeError:
                raise
            except Exception:  # noqa: S110  # not up yet; the deadline bounds the wait
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not answer within {timeout_s}s:\n{server.log()[-4000:]}")
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running(*args: object, **kwargs: object) -> Iterator[ServerProcess]:
    server = start_server(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
