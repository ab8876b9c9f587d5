"""Connections pinned to checked addresses: the lower half of SSRF-safe fetching.

A host name is resolved once and every address checked (``shared.safe_fetch``); from then
on a connection may dial only those addresses, whatever name httpcore asks for, so a
second lookup answering differently (DNS rebinding) cannot move it. Each dial also passes
a connection guard (the default re-checks the address; tests inject one that fails on any
non-loopback address). Pools of such connections are kept between downloads, one per
origin AND set of checked addresses.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import httpcore

from shared.url_safety import _address_refusal, _HttpTarget, _RefusalError

__all__ = ["ConnectionGuard", "PinnedBackend", "PinnedPools", "Resolver", "public_only_guard", "resolve_host"]

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``; the fetcher checks every address it returns."""

ConnectionGuard = Callable[[str, int], None]
"""Called with ``(ip, port)`` right before each TCP connect; raising stops the connect."""

# Keep-alive pools kept between downloads, each for one origin AND one set of checked
# addresses (see PinnedPools.get): a few, and dropped after a while without use.
_POOL_CACHE_SIZE: Final = 8
_POOL_IDLE_S: Final = 30.0
# Idle keep-alive connections close sooner than most servers drop them (a reused
# connection the server has just closed would fail the download).
_KEEPALIVE_S: Final = 5.0
_PoolKey = tuple[str, str, int, tuple[str, ...]]


async def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver: every address ``host`` has, in the resolver's order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def public_only_guard(*, allow_loopback: bool) -> ConnectionGuard:
    """Default guard: re-check the address at dial time, a second line behind the resolver check."""

    def guard(ip: str, port: int) -> None:
        reason = _address_refusal(ipaddress.ip_address(ip), allow_loopback=allow_loopback)
        if reason:
            raise _RefusalError(f"refused to connect to {reason}")

    return guard


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Dials only the addresses checked for one hop, whatever host name httpcore asks for.

    httpcore still uses the URL's host name for the Host header, SNI and certificate
    verification, so pinning does not weaken TLS.
    """

    def __init__(self, addresses: list[str], guard: ConnectionGuard) -> None:
        self._addresses = addresses
        self._guard = guard
        self._dialer = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        failure: Exception = httpcore.ConnectError("no checked address to connect to")
        for address in self._addresses:
            self._guard(address, port)
            try:
                return await self._dialer.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc  # try the host's next address, as a browser would
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self._dialer.sleep(seconds)


class PinnedPools:
    """Keep-alive pools of pinned connections, one per origin and set of checked addresses
    (LRU, idle timeout). Connections belong to the event loop that opened them: the pools
    are per loop."""

    def __init__(self, *, guard: ConnectionGuard, ssl_context: ssl.SSLContext | None) -> None:
        self._guard = guard
        self._ssl_context = ssl_context
        self._pools: collections.OrderedDict[_PoolKey, tuple[httpcore.AsyncConnectionPool, float]] = (
            collections.OrderedDict()
        )
        self._pools_loop: asyncio.AbstractEventLoop | None = None

    def get(self, target: _HttpTarget, addresses: list[str]) -> httpcore.AsyncConnectionPool:
        """The keep-alive pool for this origin and these checked addresses.

        A response that is not read to its end (a redirect, a refusal, an error) closes its
        connection rather than returning it to the pool."""
        loop = asyncio.get_running_loop()
        if loop is not self._pools_loop:
            self._pools.clear()  # the old loop's connections cannot be used (or closed) here
            self._pools_loop = loop
        now = time.monotonic()
        for key in [key for key, (_, used) in self._pools.items() if now - used > _POOL_IDLE_S]:
            _retire(self._pools.pop(key)[0])
        key = (target.scheme, target.host, target.port, tuple(addresses))
        cached = self._pools.pop(key, None)
        if cached is None:
            pool = httpcore.AsyncConnectionPool(
                ssl_context=self._ssl_context,
                max_connections=4,
                max_keepalive_connections=2,
                keepalive_expiry=_KEEPALIVE_S,
                retries=0,
                network_backend=PinnedBackend(addresses, self._guard),
            )
        else:
            pool = cached[0]
        self._pools[key] = (pool, now)  # most recently used last
        while len(self._pools) > _POOL_CACHE_SIZE:
            _retire(self._pools.popitem(last=False)[1][0])
        return pool

    async def aclose(self) -> None:
        """Close the kept connections (at shutdown; the pools stay usable)."""
        pools = [pool for pool, _ in self._pools.values()]
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


def _retire(pool: httpcore.AsyncConnectionPool) -> None:
    """Close a pool leaving the cache, unless a download is still streaming on it
    (that download's connection closes or idles out when it ends)."""
    if all(connection.is_idle() for connection in pool.connections):
        task = asyncio.get_running_loop().create_task(pool.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


# Pools being closed after leaving the cache (a reference keeps each task alive).
_closing: set[asyncio.Task[None]] = set()
