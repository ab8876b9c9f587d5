"""A small HTTP/1.1 load generator for loopback: keep-alive sockets, one thread each.

It is deliberately lean (pre-built request bytes, a minimal response parser) so that on
a 2-core machine the generator costs far less than the server it measures, and it treats
every target the same way: same connections, same duration, same warm-up.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable

__all__ = ["LoadResult", "build_request", "run_load"]

RequestFactory = Callable[[int], bytes]


@dataclasses.dataclass
class LoadResult:
    requests: int  # completed within the measured window
    errors: int
    seconds: float
    statuses: dict[int, int]
    requests_including_warmup: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def build_request(method: str, path: str, host: str, body: bytes = b"", content_type: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buffer = sock, b""
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, request: bytes) -> int:
        """Send one request and read its whole response; the HTTP status."""
        sock = self.sock or self._connect()
        sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv(sock)
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        keep_alive = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value.strip())
            elif lowered == b"transfer-encoding":
                raise RuntimeError("chunked responses are not supported by this load generator")
            elif lowered == b"connection" and value.strip().lower() == b"close":
                keep_alive = False
        while len(rest) < length:
            rest += self._recv(sock)
        self.buffer = rest[length:]
        if not keep_alive:
            self.close()
        return status

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk


def run_load(
    port: int, make_request: RequestFactory, *, connections: int, duration_s: float, warmup_s: float = 1.0
) -> LoadResult:
    """Hammer 127.0.0.1:``port`` from ``connections`` keep-alive connections for
    ``warmup_s + duration_s``; only requests completed in the last ``duration_s`` count."""
    lock = threading.Lock()
    counted = [0, 0, 0]
    statuses: dict[int, int] = {}
    start_counting = time.perf_counter() + warmup_s
    stop_at = start_counting + duration_s

    def worker(index: int) -> None:
        connection = _Connection(port)
        done = errors = everything = 0
        seen: dict[int, int] = {}
        sequence = index * 1_000_000
        try:
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    break
                sequence += 1
                try:
                    status = connection.exchange(make_request(sequence))
                except (OSError, ValueError, IndexError):
                    connection.close()
                    if time.perf_counter() >= start_counting:
                        errors += 1
                    continue
                everything += 1
                if time.perf_counter() >= start_counting:
                    done += 1
                    seen[status] = seen.get(status, 0) + 1
        finally:
            connection.close()
            with lock:
                counted[0] += done
                counted[1] += errors
                counted[2] += everything
                for status, count in seen.items():
                    statuses[status] = statuses.get(status, 0) + count

    threads = [threading.Thread(target=worker, args=(index,), daemon=True) for index in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration_s + warmup_s + 60)
    return LoadResult(
        requests=counted[0],
        errors=counted[1],
        seconds=duration_s,
        statuses=statuses,
        requests_including_warmup=counted[2],
    )
