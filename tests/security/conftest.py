"""Fixtures for the SSRF and media tests.

Two independent fences keep every test here on loopback (TESTING.md, "Network tests:
loopback only"), so a broken check fails a test instead of sending traffic out:

1. every fetcher comes from ``make_fetcher`` and is wired to ``dial_guard``, the fetcher's
   own connection hook, which raises for any address outside loopback (and the fixture
   fails the test afterwards if one was attempted);
2. ``socket.socket.connect`` is wrapped for every test in this folder and raises the same
   error, in case some path ever dialled around the hook.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from comfyswap.samples import ASTRONAUT_PNG, GRACE_HOPPER_JPG
from shared.safe_fetch import SafeFetcher
from tests.security.support import (
    DialGuard,
    LocalHttpServer,
    NonLoopbackDialError,
    ScriptedResolver,
    encode_video,
    is_loopback,
)


@pytest.fixture(autouse=True)
def _loopback_only_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Second fence: no socket may connect outside loopback during these tests, whatever the code does."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def refuse_non_loopback(address: Any) -> None:
        if isinstance(address, tuple) and not is_loopback(str(address[0])):
            raise NonLoopbackDialError(f"socket.connect to {address!r} blocked: only loopback is allowed")

    def connect(self: socket.socket, address: Any) -> None:
        refuse_non_loopback(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        refuse_non_loopback(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture
def dial_guard() -> Iterator[DialGuard]:
    guard = DialGuard()
    yield guard
    # A test that provokes a violation on purpose clears the list after asserting on it.
    assert not guard.violations, f"non-loopback connections were attempted: {guard.violations}"


@pytest.fixture
def resolver() -> ScriptedResolver:
    return ScriptedResolver()


@pytest.fixture
def make_fetcher(dial_guard: DialGuard, resolver: ScriptedResolver) -> Callable[..., SafeFetcher]:
    """A fetcher with test-sized limits, always wired to the dial guard and the scripted resolver."""

    def build(**overrides: Any) -> SafeFetcher:
        options: dict[str, Any] = {
            "max_bytes": 5 * 1024 * 1024,
            "timeout_s": 5.0,
            "max_image_pixels": 4_000_000,
            "allow_loopback": False,
            "resolver": resolver,
            "connection_guard": dial_guard,
            **overrides,
        }
        return SafeFetcher(**options)

    return build


@pytest.fixture
def http_server() -> Iterator[LocalHttpServer]:
    server = LocalHttpServer().start()
    yield server
    server.stop()


@pytest.fixture
def dest_dir(tmp_path: Path) -> Path:
    path = tmp_path / "inputs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    """Grace Hopper, 512x600 (comfyswap/samples)."""
    return GRACE_HOPPER_JPG.read_bytes()


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    """The astronaut, 512x512 PNG (comfyswap/samples)."""
    return ASTRONAUT_PNG.read_bytes()


@pytest.fixture(scope="session")
def mp4_bytes() -> bytes:
    """A tiny real MP4 (8 frames of 64x64) made with PyAV."""
    return encode_video("mp4", "mpeg4", size=64, frames=8)
