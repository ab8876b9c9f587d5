"""Start real servers for tests: a free loopback port, a subprocess, a bounded wait.

The launcher itself is comfyswap.emulators.start_process (the one `make run-emulated`
uses): every server is bound to 127.0.0.1, writes its output to a file (never an unread
pipe: the Firestore emulator stalls once a pipe fills) and is stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from comfyswap.emulators import EmulatorProcess, free_port, start_process

__all__ = ["MediaServer", "ServerProcess", "free_port", "running", "start_server", "wait_until"]

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


class _MediaHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, tuple[str, bytes]] = {}
    answers: dict[str, tuple[float, dict[str, str]]] = {}
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        entry = self.files.get(self.path)
        if entry is None:
            self.send_error(404)
            return
        content_type, body = entry
        delay_s, headers = self.answers.get(self.path, (0.0, {}))
        time.sleep(delay_s)  # a slow dependency, answering in its own server thread
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class MediaServer:
    """A real HTTP server on 127.0.0.1 serving the bytes a test puts in ``files``."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, bytes]] = {}
        self.answers: dict[str, tuple[float, dict[str, str]]] = {}
        handler = type("Handler", (_MediaHandler,), {"files": self.files, "answers": self.answers})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(
        self,
        path: str,
        content_type: str,
        body: bytes,
        *,
        delay_s: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Serve ``body`` at ``path``, after ``delay_s`` and with extra ``headers`` if given."""
        self.files[path] = (content_type, body)
        self.answers[path] = (delay_s, headers or {})
        return self.url + path

    @contextlib.contextmanager
    def running(self) -> Iterator[MediaServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
