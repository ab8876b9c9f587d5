"""``POST /prompt`` over kept-alive HTTP/1.1 connections spoken with h11 directly.

It is the one request every ComfyUI job makes, and for a small prompt httpx's layers
(request building, auth and redirect handling, the connection pool on anyio) cost about
as much of the runner's CPU as the rest of the job's hand-offs together (measured with
py-spy on figure 8's 64x64 graph). h11 (httpcore's own HTTP/1.1 parser) still does the
protocol: framing, chunked bodies, keep-alive. Every other ComfyUI call stays on httpx.

One connection per post in flight: an idle one is reused when the server has not closed
it (seen before anything is sent, never after: a prompt is never posted twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from urllib.parse import urlsplit

import h11
import httpx

__all__ = ["PromptPoster"]

# Idle connections kept; more concurrent posts than this open and close their own.
MAX_IDLE = 16


@dataclasses.dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection

    def reusable(self) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and self.protocol.our_state is h11.IDLE
            and self.protocol.their_state is h11.IDLE
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class PromptPoster:
    """POSTs JSON bodies to one plain-HTTP server; answers an ``httpx.Response`` so callers
    read it as any other. Failures to connect or talk are ``httpx.TransportError``s."""

    def __init__(self, base_url: str, *, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"PromptPoster speaks plain http only, not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._host_header = parts.netloc
        self._path_prefix = parts.path.rstrip("/")
        self._timeout_s = timeout_s
        self._idle: list[_Connection] = []

    async def post_json(self, path: str, body: bytes) -> httpx.Response:
        connection = self._take_idle() or await self._connect()
        try:
            status, headers, content = await asyncio.wait_for(
                self._exchange(connection, path, body), timeout=self._timeout_s
            )
        except TimeoutError as exc:
            connection.close()
            raise httpx.ReadTimeout(f"POST {path}: no answer within {self._timeout_s:g}s") from exc
        except (OSError, h11.ProtocolError) as exc:
            connection.close()
            raise httpx.ReadError(f"POST {path} failed: {exc!r}") from exc
        except BaseException:
            connection.close()
            raise
        if connection.protocol.our_state is h11.DONE and connection.protocol.their_state is h11.DONE:
            connection.protocol.start_next_cycle()
            if len(self._idle) < MAX_IDLE:
                self._idle.append(connection)
            else:
                connection.close()
        else:
            connection.close()
        # No httpx.Request behind it (parsing its URL cost more than the rest of the answer):
        # callers read status, headers and body, never raise_for_status() or .request.
        return httpx.Response(status, headers=headers, content=content)

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable():
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), timeout=self._timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise httpx.ConnectError(f"cannot connect to {self._host}:{self._port}: {exc!r}") from exc
        return _Connection(reader, writer, h11.Connection(h11.CLIENT))

    async def _exchange(
        self, connection: _Connection, path: str, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        protocol = connection.protocol
        request = h11.Request(
            method="POST",
            target=f"{self._path_prefix}{path}",
            headers=[
                ("Host", self._host_header),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
            ],
        )
        outgoing = protocol.send(request) or b""
        outgoing += protocol.send(h11.Data(data=body)) or b""
        outgoing += protocol.send(h11.EndOfMessage()) or b""
        connection.writer.write(outgoing)
        await connection.writer.drain()
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        while True:
            event = protocol.next_event()
            if event is h11.NEED_DATA:
                protocol.receive_data(await connection.reader.read(65536))  # b"": end of stream
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the server closed the connection before answering")

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
