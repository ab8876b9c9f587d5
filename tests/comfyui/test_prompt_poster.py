"""gpu_runner.engines.comfyui_post.PromptPoster against a real HTTP/1.1 server on loopback
(asyncio + h11, the server side): kept-alive connections, chunked answers, an idle
connection the server closed, a refused connection. The engine tests run it against the
ComfyUI double, the peer tier against the real ComfyUI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import h11
import httpx
import pytest

from gpu_runner.engines.comfyui_post import PromptPoster
from tests.servers import free_port

Answer = Callable[[h11.Connection, bytes], bytes]


def chunked_json(server: h11.Connection, body: bytes) -> bytes:
    answer = json.dumps({"prompt_id": json.loads(body)["prompt_id"], "number": 1}).encode()
    out = server.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")])) or b""
    out += server.send(h11.Data(data=answer[:5])) or b""
    out += server.send(h11.Data(data=answer[5:])) or b""
    return out + (server.send(h11.EndOfMessage()) or b"")


async def serving(
    answer: Answer, *, close_after_answer: bool, scenario: Callable[[str], Awaitable[None]]
) -> dict[str, int]:
    """Run ``scenario(base_url)`` against a server answering every POST with ``answer``;
    returns how many connections and requests it saw."""
    seen = {"connections": 0, "requests": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        server = h11.Connection(h11.SERVER)
        body = b""
        try:
            while True:
                event = server.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    server.receive_data(data)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    seen["requests"] += 1
                    writer.write(answer(server, body))
                    await writer.drain()
                    if close_after_answer:
                        return
                    server.start_next_cycle()
                    body = b""
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await scenario(f"http://127.0.0.1:{port}")
    return seen


def _post_twice(results: list[httpx.Response]) -> Callable[[str], Awaitable[None]]:
    async def scenario(base_url: str) -> None:
        poster = PromptPoster(base_url, timeout_s=10)
        try:
            for prompt_id in ("p-1", "p-2"):
                results.append(
                    await poster.post_json("/prompt", json.dumps({"prompt_id": prompt_id}).encode())
                )
                await asyncio.sleep(0.1)  # the server's close (if any) reaches the client
        finally:
            await poster.close()

    return scenario


def test_posts_share_one_kept_alive_connection_and_read_chunked_answers() -> None:
    results: list[httpx.Response] = []

    seen = asyncio.run(serving(chunked_json, close_after_answer=False, scenario=_post_twice(results)))

    assert [response.json()["prompt_id"] for response in results] == ["p-1", "p-2"]
    assert [response.status_code for response in results] == [200, 200]
    assert seen == {"connections": 1, "requests": 2}


def test_a_connection_the_server_closed_while_idle_is_not_used_and_nothing_is_posted_twice() -> None:
    results: list[httpx.Response] = []

    seen = asyncio.run(serving(chunked_json, close_after_answer=True, scenario=_post_twice(results)))

    assert [response.json()["prompt_id"] for response in results] == ["p-1", "p-2"]
    assert seen == {"connections": 2, "requests": 2}


def test_nothing_listening_is_a_connect_error() -> None:
    poster = PromptPoster(f"http://127.0.0.1:{free_port()}", timeout_s=5)

    with pytest.raises(httpx.ConnectError):
        asyncio.run(poster.post_json("/prompt", b"{}"))
