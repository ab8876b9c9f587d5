"""SafeFetcher refuses unsafe targets before connecting: literals, DNS answers, redirect hops.

Every fetcher here dials through ``dial_guard``, which fails the test for any non-loopback
address, and the resolver is scripted: nothing here can reach beyond 127.0.0.0/8.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import pinned_http, safe_fetch, url_safety
from shared.errors import JobFailed, UnsafeInput, UpstreamUnavailable
from shared.safe_fetch import SafeFetcher, resolve_host
from tests.security.support import (
    DialGuard,
    LocalHttpServer,
    NonLoopbackDialError,
    ScriptedResolver,
    load_corpus,
    run,
)

CORPUS = load_corpus()
FIELD = "task_data.target_url"


@pytest.mark.parametrize("entry", CORPUS["refused_urls"], ids=lambda entry: entry["why"])
def test_refuses_every_corpus_url_without_dialling(
    entry: dict[str, str], make_fetcher: Callable[..., SafeFetcher], dial_guard: DialGuard, dest_dir: Path
) -> None:
    fetcher = make_fetcher()

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(entry["url"], dest_dir, field=FIELD))

    assert caught.value.code == "unsafe_url"
    assert caught.value.details["field"] == FIELD
    assert FIELD in caught.value.message
    assert dial_guard.attempts == []
    assert list(dest_dir.iterdir()) == []


@pytest.mark.parametrize("entry", CORPUS["refused_by_dns"], ids=lambda entry: entry["why"])
def test_refuses_names_with_any_non_public_address_without_dialling(
    entry: dict[str, object],
    make_fetcher: Callable[..., SafeFetcher],
    resolver: ScriptedResolver,
    dial_guard: DialGuard,
    dest_dir: Path,
) -> None:
    url = str(entry["url"])
    host = url.split("/")[2]
    addresses = entry["addresses"]
    assert isinstance(addresses, list)
    resolver.add(host, addresses)
    fetcher = make_fetcher()

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "unsafe_url"
    assert "resolves to" in caught.value.message
    assert len(resolver.calls) == 1
    assert dial_guard.attempts == []


def test_open_redirect_into_a_private_address_is_refused_before_the_second_connect(
    make_fetcher: Callable[..., SafeFetcher],
    http_server: LocalHttpServer,
    dial_guard: DialGuard,
    dest_dir: Path,
) -> None:
    url = http_server.redirect("/open-redirect", "http://10.0.0.1/latest/meta-data/")
    fetcher = make_fetcher(allow_loopback=True)

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "unsafe_url"
    assert "redirect" in caught.value.message
    assert "10.0.0.1" in caught.value.message
    assert dial_guard.attempts == [("127.0.0.1", http_server.port)]
    assert http_server.hits("/open-redirect") == 1


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/computeMetadata/v1/",
        "http://metadata.google.internal/",
        "http://[::ffff:10.0.0.1]/",
        "http://0x0a000001/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
        "data:image/png;base64,iVBORw0KGgo=",
        "http://user:secret@example.com/",
    ],
)
def test_redirects_to_refused_targets_are_refused(
    location: str,
    make_fetcher: Callable[..., SafeFetcher],
    http_server: LocalHttpServer,
    dial_guard: DialGuard,
    dest_dir: Path,
) -> None:
    url = http_server.redirect("/hop", location, status=307)
    fetcher = make_fetcher(allow_loopback=True)

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "unsafe_url"
    assert dial_guard.attempts == [("127.0.0.1", http_server.port)]


def test_redirect_to_a_name_resolving_privately_is_refused_before_connecting(
    make_fetcher: Callable[..., SafeFetcher],
    http_server: LocalHttpServer,
    resolver: ScriptedResolver,
    dial_guard: DialGuard,
    dest_dir: Path,
) -> None:
    resolver.add("internal.example.test", ["10.0.0.7"])
    url = http_server.redirect("/hop", "http://internal.example.test/secret")
    fetcher = make_fetcher(allow_loopback=True)

    with pytest.raises(UnsafeInput, match="resolves to a private address"):
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert resolver.calls == [("internal.example.test", 80)]
    assert dial_guard.attempts == [("127.0.0.1", http_server.port)]


def test_a_redirect_back_to_loopback_is_refused_when_loopback_is_not_allowed(
    make_fetcher: Callable[..., SafeFetcher],
    http_server: LocalHttpServer,
    resolver: ScriptedResolver,
    dial_guard: DialGuard,
    dest_dir: Path,
) -> None:
    """A name that resolved to loopback on the first hop is re-checked on the next, not trusted."""
    resolver.add("cdn.example.test", ["127.0.0.1"])
    fetcher = make_fetcher(allow_loopback=False)

    with pytest.raises(UnsafeInput, match="loopback"):
        run(fetcher.fetch_to_file(http_server.url("/x", host="cdn.example.test"), dest_dir, field=FIELD))

    assert dial_guard.attempts == []


def test_the_connection_guard_catches_a_bypassed_check(
    make_fetcher: Callable[..., SafeFetcher],
    resolver: ScriptedResolver,
    dial_guard: DialGuard,
    dest_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the address check were broken, the dial hook is still reached and fails the test."""
    # One implementation, two users: url_safety (literal hosts) and the resolver check here.
    monkeypatch.setattr(url_safety, "_address_refusal", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(safe_fetch, "_address_refusal", lambda *_args, **_kwargs: None)
    resolver.add("rebind.example.test", ["10.0.0.1"])
    fetcher = make_fetcher()

    with pytest.raises(NonLoopbackDialError):
        run(fetcher.fetch_to_file("http://rebind.example.test/", dest_dir, field=FIELD))
    with pytest.raises(NonLoopbackDialError):
        run(fetcher.fetch_to_file("http://169.254.169.254/", dest_dir, field=FIELD))

    assert dial_guard.violations == [("10.0.0.1", 80), ("169.254.169.254", 80)]
    dial_guard.violations.clear()  # expected here; the fixture fails on any other


def test_the_default_guard_refuses_non_public_addresses_at_dial_time() -> None:
    """The production guard re-checks each address at dial time, behind the resolver check."""
    guard = pinned_http.public_only_guard(allow_loopback=False)
    loopback_guard = pinned_http.public_only_guard(allow_loopback=True)

    for address in ("10.0.0.1", "169.254.169.254", "::1", "127.0.0.1", "fd00::1", "::ffff:10.0.0.1"):
        with pytest.raises(safe_fetch._RefusalError):
            guard(address, 80)
    with pytest.raises(safe_fetch._RefusalError):
        loopback_guard("10.0.0.1", 80)
    guard("93.184.216.34", 443)
    loopback_guard("127.0.0.1", 80)
    loopback_guard("::1", 80)


def test_the_default_guard_lets_allowed_loopback_through(
    http_server: LocalHttpServer, dest_dir: Path, png_bytes: bytes
) -> None:
    url = http_server.serve("/a.png", png_bytes)
    fetcher = SafeFetcher(max_bytes=10**6, timeout_s=5, max_image_pixels=10**6, allow_loopback=True)

    fetched = run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert fetched.kind == "image"


def test_a_public_address_reaches_the_guard_and_no_further(
    make_fetcher: Callable[..., SafeFetcher],
    resolver: ScriptedResolver,
    dial_guard: DialGuard,
    dest_dir: Path,
) -> None:
    """Proves the guard sits on the only connect path: a public address passes every check
    and is stopped at the dial (the test double refuses all non-loopback dials)."""
    resolver.add("images.example.test", ["93.184.216.34"])
    fetcher = make_fetcher()

    with pytest.raises(NonLoopbackDialError):
        run(fetcher.fetch_to_file("https://images.example.test/face.jpg", dest_dir, field=FIELD))

    assert dial_guard.violations == [("93.184.216.34", 443)]
    dial_guard.violations.clear()


def test_dns_is_resolved_once_per_hop_and_the_connection_is_pinned(
    make_fetcher: Callable[..., SafeFetcher],
    http_server: LocalHttpServer,
    resolver: ScriptedResolver,
    dial_guard: DialGuard,
    dest_dir: Path,
    jpeg_bytes: bytes,
) -> None:
    """The host name is looked up once; the socket goes to that answer; Host keeps the name."""
    resolver.add("images.example.test", ["127.0.0.1"])
    http_server.serve("/face.jpg", jpeg_bytes)
    fetcher = make_fetcher(allow_loopback=True)

    fetched = run(
        fetcher.fetch_to_file(http_server.url("/face.jpg", host="images.example.test"), dest_dir, field=FIELD)
    )

    assert fetched.content_type == "image/jpeg"
    assert resolver.calls == [("images.example.test", http_server.port)]
    assert dial_guard.attempts == [("127.0.0.1", http_server.port)]
    assert http_server.requests[0][1]["Host"] == f"images.example.test:{http_server.port}"


def test_a_dead_address_falls_through_to_the_next_checked_address(
    make_fetcher: Callable[..., SafeFetcher],
    http_server: LocalHttpServer,
    resolver: ScriptedResolver,
    dial_guard: DialGuard,
    dest_dir: Path,
    png_bytes: bytes,
) -> None:
    # 127.0.0.2 has nothing listening on this port: the connection is refused at once.
    resolver.add("multi.example.test", ["127.0.0.2", "127.0.0.1"])
    http_server.serve("/a.png", png_bytes)
    fetcher = make_fetcher(allow_loopback=True)

    fetched = run(
        fetcher.fetch_to_file(http_server.url("/a.png", host="multi.example.test"), dest_dir, field=FIELD)
    )

    assert fetched.kind == "image"
    assert dial_guard.attempts == [("127.0.0.2", http_server.port), ("127.0.0.1", http_server.port)]


# What the resolver answers -> the error (not UnsafeInput: the URL was fine) and whether
# it is retried.
DNS_FAILURES = {
    "a name that does not exist is permanent": (
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        JobFailed,
        False,
    ),
    "a temporary resolver failure is retryable": (
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        UpstreamUnavailable,
        True,
    ),
    "an empty answer is permanent": ([], JobFailed, False),
}


@pytest.mark.parametrize(("answer", "error", "retryable"), DNS_FAILURES.values(), ids=DNS_FAILURES.keys())
def test_dns_failures_are_unreachable_inputs(
    make_fetcher: Callable[..., SafeFetcher],
    resolver: ScriptedResolver,
    dest_dir: Path,
    answer: list[str] | BaseException,
    error: type[Exception],
    retryable: bool,
) -> None:
    resolver.add("failing.example.test", answer)

    with pytest.raises(error) as caught:
        run(make_fetcher().fetch_to_file("http://failing.example.test/a.jpg", dest_dir, field=FIELD))

    assert getattr(caught.value, "code", None) == "input_unreachable"
    assert getattr(caught.value, "retryable", None) is retryable
    assert not isinstance(caught.value, UnsafeInput)


def test_the_system_resolver_returns_literal_addresses_without_a_lookup() -> None:
    addresses = run(resolve_host("127.0.0.1", 80))

    assert [ipaddress.ip_address(address) for address in addresses] == [ipaddress.ip_address("127.0.0.1")]
