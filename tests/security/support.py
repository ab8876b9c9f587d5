"""Test doubles and helpers for the SSRF and media tests (fixtures live in conftest.py).

``DialGuard`` is the fetcher's connection hook in tests: it fails the test for any address
outside loopback instead of connecting. ``ScriptedResolver`` answers only for names a test
registered, so no test ever asks real DNS. ``LocalHttpServer`` is a real threaded HTTP(S)
server on 127.0.0.1 whose answers each test scripts per path.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import ssl
import struct
import threading
import zlib
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np

T = TypeVar("T")

CORPUS_PATH = Path(__file__).with_name("ssrf_corpus.json")
ASYNC_TEST_TIMEOUT_S = 10.0


class NonLoopbackDialError(AssertionError):
    """A connection outside 127.0.0.0/8 and ::1 was attempted: the test fails, nothing is sent."""


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class DialGuard:
    """Records every dial the fetcher attempts and refuses (raises) the non-loopback ones."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []
        self.violations: list[tuple[str, int]] = []

    def __call__(self, ip: str, port: int) -> None:
        self.attempts.append((ip, port))
        if not is_loopback(ip):
            self.violations.append((ip, port))
            raise NonLoopbackDialError(f"test tried to connect to {ip}:{port}; only loopback is allowed")


class ScriptedResolver:
    """Answers only for registered names; an unexpected lookup fails instead of using real DNS."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str] | BaseException] = {}
        self.calls: list[tuple[str, int]] = []

    def add(self, host: str, answer: list[str] | BaseException) -> None:
        self.answers[host] = answer

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.answers:
            raise AssertionError(f"unexpected DNS lookup of {host!r}; register it with resolver.add()")
        answer = self.answers[host]
        if isinstance(answer, BaseException):
            raise answer
        return list(answer)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one fetch to completion under a bound, so no test can hang."""

    async def bounded() -> T:
        async with asyncio.timeout(ASYNC_TEST_TIMEOUT_S):
            return await coroutine

    return asyncio.run(bounded())


RouteHandler = Callable[[BaseHTTPRequestHandler], None]


class LocalHttpServer:
    """A threaded HTTP server on 127.0.0.1 and an ephemeral port, scripted per path."""

    def __init__(self, tls_context: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, RouteHandler] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        if tls_context is not None:
            # The handshake runs in the handler thread, on the first read.
            self._httpd.socket = tls_context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> LocalHttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # releases handlers that stall on purpose
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str, *, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for request_path, _ in self.requests if request_path == path)

    def serve(
        self,
        path: str,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
    ) -> str:
        def respond(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(body)

        return self.handle(path, respond)

    def redirect(self, path: str, location: str, *, status: int = 302) -> str:
        return self.serve(path, b"", status=status, headers={"Location": location})

    def handle(self, path: str, respond: RouteHandler) -> str:
        self.routes[path] = respond
        return self.url(path)


def _make_handler(server: LocalHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            server.requests.append((self.path, dict(self.headers.items())))
            respond = server.routes.get(self.path)
            if respond is None:
                self.send_error(404)
                return
            respond(self)

        def log_message(self, format: str, *args: Any) -> None:  # the stdlib's signature
            """Keep test output quiet."""

    return Handler


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG declaring ``width`` x ``height`` but holding one row: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    one_row = zlib.compress(b"\0" * (width * 3 + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", one_row) + chunk(b"IEND", b"")


def data_url(media_type: str, payload: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(payload).decode('ascii')}"


def load_corpus() -> dict[str, list[dict[str, Any]]]:
    corpus: dict[str, list[dict[str, Any]]] = json.loads(CORPUS_PATH.read_text(encoding="utf-8"))
    return corpus


def encode_video(container_format: str, codec: str, *, size: int = 32, frames: int = 4) -> bytes:
    """A tiny real video made with PyAV (tests make their own media; nothing is downloaded)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=8)
        assert isinstance(stream, av.VideoStream)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            pixels = np.full((size, size, 3), index * 30, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
