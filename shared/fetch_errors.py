"""How a fetch fails: the status of an answer read as a redirect, a retryable or a final
failure, and the errors (each naming the task's field) that SafeFetcher raises."""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Final, NoReturn

import httpcore

from shared.errors import JobFailed, UnsafeInput, UpstreamUnavailable
from shared.logs import get_logger, log_event
from shared.url_safety import _HttpTarget, _RefusalError

__all__ = [
    "check_status",
    "header",
    "is_certificate_error",
    "raise_resolution_failure",
    "too_large",
    "unreachable",
    "unsafe_input",
]

_logger = get_logger("shared.safe_fetch")

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
# 408/425/429 say "not now", so they are retried like a 5xx.
_TRANSIENT_CLIENT_STATUSES: Final = frozenset({408, 425, 429})


def check_status(
    response: httpcore.Response, target: _HttpTarget, field: str, *, max_bytes: int
) -> str | None:
    """The redirect location, None for a 200 to read, or the error the status means."""
    status = response.status
    details = {"field": field, "host": target.host, "status": status}
    if status in _REDIRECT_STATUSES:
        location = header(response, b"location")
        if location is None:
            raise JobFailed(
                f"{field}: HTTP {status} without a Location", code="input_not_found", details=details
            )
        return location
    if status >= 500 or status in _TRANSIENT_CLIENT_STATUSES:
        raise UpstreamUnavailable(
            f"{field}: {target.host} answered HTTP {status}", code="input_unreachable", details=details
        )
    if status >= 400:
        raise JobFailed(
            f"{field}: {target.host} answered HTTP {status}", code="input_not_found", details=details
        )
    if status != 200:
        raise JobFailed(
            f"{field}: {target.host} answered HTTP {status}, not 200",
            code="input_not_found",
            details=details,
        )
    declared = header(response, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(field, max_bytes)
    return None


_PERMANENT_RESOLVER_ERRORS: Final = frozenset(
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
)


def raise_resolution_failure(host: str, field: str, exc: socket.gaierror | None) -> NoReturn:
    """A name that does not exist will not start to; a resolver hiccup may pass."""
    details = {"field": field, "host": host}
    if exc is None or exc.errno in _PERMANENT_RESOLVER_ERRORS:
        raise JobFailed(f"{field}: host {host!r} does not exist", code="input_unreachable", details=details)
    raise UpstreamUnavailable(
        f"{field}: could not resolve {host!r} ({exc.strerror})", code="input_unreachable", details=details
    )


def unsafe_input(field: str, refusal: _RefusalError) -> UnsafeInput:
    log_event(
        _logger, "input_refused", level=logging.WARNING, field=field, reason=refusal.reason, code=refusal.code
    )
    return UnsafeInput(
        f"{field}: refused: {refusal.reason}",
        code=refusal.code,
        details={"field": field, "reason": refusal.reason},
    )


def unreachable(field: str, target: _HttpTarget, reason: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        f"{field}: could not download from {target.host}: {reason}",
        code="input_unreachable",
        details={"field": field, "host": target.host},
    )


def too_large(field: str, max_bytes: int) -> UnsafeInput:
    return UnsafeInput(
        f"{field}: input is larger than {max_bytes} bytes",
        code="input_too_large",
        details={"field": field, "max_bytes": max_bytes},
    )


def header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def is_certificate_error(exc: BaseException) -> bool:
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:  # chains can loop
        chain.append(link)
        link = link.__cause__ or link.__context__
    return any(isinstance(link, ssl.SSLCertVerificationError) for link in chain)
