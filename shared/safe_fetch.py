"""Fetch user-supplied input URLs without letting them reach our own network (SSRF).

A task names its inputs by URL, and the runner downloads them from inside our cloud
network, next to the metadata server (169.254.169.254) and internal services. So:

* ``check_input_url`` is the cheap check at task creation (no network): http(s) or a
  ``data:`` image/video only, no credentials, no private, loopback or metadata host in any
  spelling a resolver would accept (``127.1``, ``0x7f000001``, ``[::ffff:127.0.0.1]``...).
  It lives in ``shared.url_safety`` (no httpcore, no PIL to import) and is re-exported here.
* ``SafeFetcher.fetch_to_file`` is the download in the runner. It resolves each host
  once, refuses it if ANY address is not public, and connects only to those checked
  addresses (a second lookup could answer differently: DNS rebinding). Redirects are
  followed by hand so every hop is checked the same way before a connection is made.
  Size and time are capped while streaming, and the bytes are sniffed and (for images)
  decoded under a pixel cap, because headers and names are the sender's to choose.

Pinning works below HTTP (``shared.pinned_http``): requests go through ``httpcore`` with a
network backend that ignores the host name it is given and dials only the checked
addresses. TLS still verifies the certificate against the URL's host name (and sends it as
SNI), because httpcore takes ``server_hostname`` from the URL, not from the socket. Every
dial also passes a connection guard first; tests inject one that fails on any non-loopback
address. What an answer's status means and the errors raised are in ``shared.fetch_errors``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin

import httpcore

from shared.errors import JobFailed, UnsafeInput, UpstreamUnavailable
from shared.fetch_errors import (
    check_status,
    is_certificate_error,
    raise_resolution_failure,
    too_large,
    unreachable,
    unsafe_input,
)
from shared.inputs import InputRef, InputStore, is_input_ref, make_input_store
from shared.logs import get_logger, log_event
from shared.media import MEDIA_EXTENSIONS, check_image, sniff_kind
from shared.pinned_http import (
    ConnectionGuard,
    PinnedBackend,
    PinnedPools,
    Resolver,
    public_only_guard,
    resolve_host,
)
from shared.settings import Settings
from shared.url_safety import (
    DEFAULT_MAX_INPUT_BYTES,
    MAX_URL_LENGTH,
    _address_refusal,
    _decode_data_url,
    _HttpTarget,
    _is_data_url,
    _parse_http_url,
    _RefusalError,
    check_input_url,
)

__all__ = [
    "DEFAULT_MAX_INPUT_BYTES",
    "MAX_URL_LENGTH",
    "ConnectionGuard",
    "FetchedInput",
    "Resolver",
    "SafeFetcher",
    "check_input_url",
    "resolve_host",
]

# (path, *, max_pixels, max_frames, max_duration_s) -> (width, height): shared.video.check_video
VideoCheck = Callable[..., tuple[int, int]]

_logger = get_logger(__name__)


# --------------------------------------------------------------------------------------
# The fetcher
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FetchedInput:
    """A downloaded input, described by what its bytes are rather than what the server said."""

    path: Path
    content_type: str  # sniffed, e.g. image/jpeg
    size: int
    kind: str  # "image" or "video"
    width: int | None  # images only
    height: int | None
    source_url: str  # as requested (a data: URL is shortened to its media type)
    final_url: str  # after redirects; equals source_url when there were none


@dataclasses.dataclass(eq=False, repr=False, kw_only=True)
class SafeFetcher:
    """Downloads task inputs with the SSRF, size, time and content checks of DESIGN.md §8.

    One instance per process is enough. It keeps a few keep-alive connection pools
    between downloads, each bound to one origin and the exact addresses that origin's
    name resolved to and passed the checks for this download: a pool only ever dials
    those addresses (through the guard), and a download whose name now resolves to any
    other set gets another pool. The names are still resolved and checked every time.

    ``resolver`` and ``connection_guard`` are injected by tests (no real DNS, no dial
    outside loopback); ``ssl_context`` lets them trust a test CA. Defaults: the system
    resolver, a guard refusing non-public addresses, httpcore's certifi context.
    """

    max_bytes: int
    timeout_s: float
    max_image_pixels: int
    allow_loopback: bool = False
    max_redirects: int = 5
    resolver: Resolver = resolve_host
    connection_guard: ConnectionGuard | None = None
    ssl_context: ssl.SSLContext | None = None
    # Where ``input:`` references (data: inputs kept out of the task) are read; built on
    # first use, so a fetcher that never meets one never opens a storage client.
    input_store: Callable[[], InputStore] | None = None
    max_video_frames: int = 18_000
    max_video_duration_s: float = 600.0
    # shared.video.check_video on the runner (PyAV); None where no video is ever fetched.
    check_video: VideoCheck | None = None

    def __post_init__(self) -> None:
        self._guard = self.connection_guard or public_only_guard(allow_loopback=self.allow_loopback)
        self._pools = PinnedPools(guard=self._guard, ssl_context=self.ssl_context)
        self._input_store: InputStore | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, check_video: VideoCheck | None = None) -> SafeFetcher:
        return cls(
            max_bytes=settings.fetch_max_bytes,
            timeout_s=settings.fetch_timeout_s,
            max_image_pixels=settings.max_image_pixels,
            allow_loopback=settings.fetch_allow_loopback,
            input_store=lambda: make_input_store(settings),
            max_video_frames=settings.max_video_frames,
            max_video_duration_s=settings.max_video_duration_s,
            check_video=check_video,
        )

    async def fetch_to_file(
        self,
        url: str,
        dest_dir: Path,
        *,
        field: str,
        allowed_kinds: frozenset[str] = frozenset({"image", "video"}),
    ) -> FetchedInput:
        """Download ``url`` (http, https or data:) into a new file in ``dest_dir``.

        Errors name ``field``: ``UnsafeInput`` (``unsafe_url``, ``too_many_redirects``,
        ``input_too_large``, ``unsupported_media``, ``image_too_large``, ``corrupt_media``),
        ``JobFailed`` (``input_not_found``; ``input_unreachable`` for a name that does not
        exist or a bad certificate) and ``UpstreamUnavailable`` (``input_unreachable``:
        timeouts, refused connections, 5xx; retryable).
        """
        dest_dir.mkdir(parents=True, exist_ok=True)
        stem = f"input-{uuid.uuid4().hex}"
        part_path = dest_dir / f"{stem}.part"
        try:
            if _is_data_url(url):
                source_url = final_url = url[: url.find(",") + 1] + "..."
                # Decoding and writing up to FETCH_MAX_BYTES is seconds of work: off the loop.
                size = await asyncio.to_thread(self._write_data_url, url, part_path, field)
            elif is_input_ref(url):
                source_url = final_url = url
                size = await self._write_stored_input(url, part_path, field)
            else:
                source_url = url
                final_url, size = await self._download_within_deadline(url, part_path, field)
            return await self._inspect(part_path, stem, size, field, allowed_kinds, source_url, final_url)
        except BaseException:
            part_path.unlink(missing_ok=True)
            raise

    async def post_json(
        self, url: str, body: bytes, *, headers: dict[str, str], field: str
    ) -> tuple[int, bytes]:
        """POST ``body`` to ``url`` with the same SSRF rules as a download (webhooks).

        No redirects are followed (a webhook receiver answers, it does not move), the answer
        is capped at 64 KiB and the whole call at ``timeout_s``. Returns (status, body)."""
        try:
            target = _parse_http_url(url, allow_loopback=self.allow_loopback)
        except _RefusalError as refusal:
            raise unsafe_input(field, refusal) from None
        addresses = await self._resolve_checked(target, field)
        request_headers = [
            (b"Host", target.host_header.encode("ascii")),
            (b"User-Agent", b"ComfySwap-webhooks/1"),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            *((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()),
        ]
        timeout = dict.fromkeys(("connect", "read", "write", "pool"), self.timeout_s)
        backend = PinnedBackend(addresses, self._guard)
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                httpcore.AsyncConnectionPool(
                    ssl_context=self.ssl_context, max_connections=1, retries=0, network_backend=backend
                ) as pool,
                pool.stream(
                    b"POST",
                    httpcore.URL(
                        scheme=target.scheme.encode("ascii"),
                        host=target.host.encode("ascii"),
                        port=target.port,
                        target=target.target.encode("ascii"),
                    ),
                    headers=request_headers,
                    content=body,
                    extensions={"timeout": timeout},
                ) as response,
            ):
                answer = b""
                async for chunk in response.aiter_stream():
                    answer += chunk
                    if len(answer) > 65536:
                        break
                return response.status, answer[:65536]
        except (TimeoutError, httpcore.TimeoutException) as exc:
            raise unreachable(field, target, f"timed out ({type(exc).__name__})") from None
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
            raise unreachable(field, target, f"{type(exc).__name__}: {exc}") from None

    def _write_data_url(self, url: str, part_path: Path, field: str) -> int:
        try:
            _, payload = _decode_data_url(url, max_bytes=self.max_bytes)
        except _RefusalError as refusal:
            raise unsafe_input(field, refusal) from None
        with part_path.open("xb") as file:
            file.write(payload)
        return len(payload)

    async def _write_stored_input(self, url: str, part_path: Path, field: str) -> int:
        """A ``data:`` input the API kept in the input store, checked against its digest."""
        try:
            ref = InputRef.parse(url)
            if ref.size > self.max_bytes:
                raise UnsafeInput(f"input is larger than {self.max_bytes} bytes", code="input_too_large")
            if self._input_store is None:
                if self.input_store is None:
                    raise UnsafeInput("this fetcher reads no stored inputs", code="unsafe_url")
                self._input_store = self.input_store()
            payload = await asyncio.to_thread(self._input_store.read, ref)
        except UnsafeInput as exc:
            raise UnsafeInput(
                f"{field}: {exc.message}", code=exc.code, details={**exc.details, "field": field}
            ) from None
        await asyncio.to_thread(part_path.write_bytes, payload)
        return len(payload)

    async def _download_within_deadline(self, url: str, part_path: Path, field: str) -> tuple[str, int]:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._download(url, part_path, field)
        except TimeoutError:
            raise UpstreamUnavailable(
                f"{field}: download did not finish within {self.timeout_s:g}s",
                code="input_unreachable",
                details={"field": field},
            ) from None

    async def _download(self, url: str, part_path: Path, field: str) -> tuple[str, int]:
        """Follow redirects by hand; each hop is checked and resolved before it is dialled."""
        current_url = url
        for hop in range(self.max_redirects + 1):
            try:
                target = _parse_http_url(current_url, allow_loopback=self.allow_loopback)
            except _RefusalError as refusal:
                if hop:
                    refusal.reason = f"redirect to a refused URL: {refusal.reason}"
                raise unsafe_input(field, refusal) from None
            addresses = await self._resolve_checked(target, field)
            location = await self._request(target, addresses, part_path, field)
            if location is None:
                return current_url, part_path.stat().st_size
            current_url = urljoin(current_url, location)
            log_event(_logger, "input_redirect", level=logging.DEBUG, field=field, hop=hop + 1)
        raise UnsafeInput(
            f"{field}: more than {self.max_redirects} redirects",
            code="too_many_redirects",
            details={"field": field},
        )

    async def _resolve_checked(self, target: _HttpTarget, field: str) -> list[str]:
        """Resolve once; refuse if ANY address is not public (one private answer is enough)."""
        if target.address is not None:
            return [str(target.address)]
        try:
            answers = await self.resolver(target.host, target.port)
        except socket.gaierror as exc:
            raise_resolution_failure(target.host, field, exc)
        if not answers:
            raise_resolution_failure(target.host, field, None)
        addresses: list[str] = []
        for answer in answers:
            try:
                address = ipaddress.ip_address(answer.split("%", 1)[0])
            except ValueError:
                raise unsafe_input(
                    field, _RefusalError(f"resolver returned {answer!r} for {target.host!r}")
                ) from None
            reason = _address_refusal(address, allow_loopback=self.allow_loopback)
            if reason:
                raise unsafe_input(field, _RefusalError(f"host {target.host!r} resolves to {reason}"))
            addresses.append(str(address))
        return addresses

    async def _request(
        self, target: _HttpTarget, addresses: list[str], part_path: Path, field: str
    ) -> str | None:
        """GET one hop: the redirect location, or None once the body is in ``part_path``."""
        timeout = {
            "connect": self.timeout_s,
            "read": self.timeout_s,
            "write": self.timeout_s,
            "pool": self.timeout_s,
        }
        headers = [
            (b"Host", target.host_header.encode("ascii")),
            (b"User-Agent", b"ComfySwap-input-fetcher/1"),
            (b"Accept", b"image/*, video/*"),
            (b"Accept-Encoding", b"identity"),  # sniff and count the bytes as they are stored
        ]
        url = httpcore.URL(
            scheme=target.scheme.encode("ascii"),
            host=target.host.encode("ascii"),
            port=target.port,
            target=target.target.encode("ascii"),
        )
        pool = self._pools.get(target, addresses)
        try:
            async with pool.stream(b"GET", url, headers=headers, extensions={"timeout": timeout}) as response:
                location = check_status(response, target, field, max_bytes=self.max_bytes)
                if location is not None:
                    return location
                await self._stream_body(response, part_path, field)
                return None
        except _RefusalError as refusal:  # the default connection guard's last-moment refusal
            raise unsafe_input(field, refusal) from None
        except httpcore.TimeoutException as exc:
            raise unreachable(field, target, f"timed out ({type(exc).__name__})") from None
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
            if is_certificate_error(exc):
                raise JobFailed(
                    f"{field}: the TLS certificate of {target.host} is not valid ({exc})",
                    code="input_unreachable",
                    details={"field": field, "host": target.host},
                ) from None
            raise unreachable(field, target, f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        """Close the kept connections (at shutdown; the fetcher stays usable)."""
        await self._pools.aclose()

    async def _stream_body(self, response: httpcore.Response, part_path: Path, field: str) -> None:
        """Count while streaming: Content-Length may be absent, or chunked bodies may run on."""
        received = 0
        with part_path.open("xb") as file:
            async for chunk in response.aiter_stream():
                received += len(chunk)
                if received > self.max_bytes:
                    raise too_large(field, self.max_bytes)
                file.write(chunk)

    async def _inspect(
        self,
        part_path: Path,
        stem: str,
        size: int,
        field: str,
        allowed_kinds: frozenset[str],
        source_url: str,
        final_url: str,
    ) -> FetchedInput:
        """Sniff and (for images) decode under the pixel cap, then give the file its real extension."""
        try:
            kind, content_type = sniff_kind(part_path)
            if kind not in allowed_kinds:
                raise UnsafeInput(
                    f"input is a {kind}, expected {' or '.join(sorted(allowed_kinds))}",
                    code="unsupported_media",
                )
            width = height = None
            if kind == "image":
                # A full decode is CPU-bound; keep it off the event loop.
                width, height = await asyncio.to_thread(check_image, part_path, self.max_image_pixels)
            elif kind == "video" and self.check_video is not None:
                # Frame size, count and duration from the container's metadata, before any
                # engine decodes a frame (a one-frame 16000x16000 clip, a 100k-frame clip).
                width, height = await asyncio.to_thread(
                    self.check_video,
                    part_path,
                    max_pixels=self.max_image_pixels,
                    max_frames=self.max_video_frames,
                    max_duration_s=self.max_video_duration_s,
                )
        except UnsafeInput as exc:
            raise UnsafeInput(
                f"{field}: {exc.message}", code=exc.code, details={**exc.details, "field": field}
            ) from exc
        final_path = part_path.with_name(stem + MEDIA_EXTENSIONS[content_type])
        part_path.rename(final_path)
        return FetchedInput(
            path=final_path,
            content_type=content_type,
            size=size,
            kind=kind,
            width=width,
            height=height,
            source_url=source_url,
            final_url=final_url,
        )
