"""The static checks of a user-supplied input URL: everything decided without the network.

``check_input_url`` runs at task creation (http(s) or a ``data:`` image/video only, no
credentials, no private, loopback or metadata host in any spelling a resolver would
accept: ``127.1``, ``0x7f000001``, ``[::ffff:127.0.0.1]``...). ``shared.safe_fetch``
builds its download checks on the same helpers (one implementation) and re-exports
``check_input_url``. This module imports neither httpcore nor the media decoders, so
the API functions that only check URLs start without them; sniffing a ``data:``
payload imports ``shared.media`` when it is first needed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import ipaddress
import re
from typing import Final
from urllib.parse import SplitResult, quote, urlsplit

from shared.errors import UnsafeInput, ValidationFailed

__all__ = [
    "DEFAULT_MAX_INPUT_BYTES",
    "MAX_URL_LENGTH",
    "check_input_url",
    "data_url_payload",
    "is_data_url",
]

MAX_URL_LENGTH: Final = 8192
DEFAULT_MAX_INPUT_BYTES: Final = 100 * 1024 * 1024  # Settings.fetch_max_bytes' default

_HTTP_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

# Names that reach the platform rather than the internet. Single-label names are refused
# too (see _check_host_name): resolvers complete them with the VPC's search domains.
_BLOCKED_HOST_NAMES: Final = frozenset(
    {"localhost", "metadata", "metadata.google.internal", "metadata.goog", "instance-data"}
)
_BLOCKED_HOST_SUFFIXES: Final = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa", ".svc")
_LOOPBACK_NAMES: Final = frozenset({"localhost"})

_HOST_NAME_CHARS: Final = re.compile(r"[a-z0-9_.-]+")
# Anything a browser or libc would rewrite or cut at: whitespace, controls, backslash.
_URL_FORBIDDEN_CHARS: Final = re.compile(r"[\x00-\x20\x7f\\]")
_NUMERIC_LABEL: Final = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")
# Four decimal octets 0-255 without leading zeros (a leading zero means octal: not this form).
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_DECIMAL: Final = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_DATA_URL: Final = re.compile(
    r"data:(?P<media_type>[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+)(?P<params>(?:;[^;,]*)*),(?P<payload>.*)",
    re.IGNORECASE | re.DOTALL,
)
_BASE64_CHARS: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}")

# Besides ipaddress' own flags (is_private, is_reserved...), which differ between Python
# patch releases, these ranges are listed explicitly so the policy does not drift.
_NON_PUBLIC_NETWORKS: Final[tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...]] = tuple(
    (ipaddress.ip_network(network), label)
    for network, label in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "reserved"),
        ("64:ff9b:1::/48", "private"),
        ("100::/64", "reserved"),
        ("2001::/23", "reserved"),
        ("2001:db8::/32", "reserved"),
        ("3fff::/20", "reserved"),
        ("5f00::/16", "reserved"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64_PREFIX: Final = ipaddress.IPv6Network("64:ff9b::/96")


class _RefusalError(Exception):
    """Why a URL or address is refused; the public entry points turn it into their own error."""

    def __init__(self, reason: str, code: str = "unsafe_url") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# --------------------------------------------------------------------------------------
# Addresses and host names
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _address_refusal(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_loopback: bool
) -> str | None:
    """Why ``address`` must not be contacted, or None when it is public (or allowed loopback)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = _address_refusal(embedded, allow_loopback=allow_loopback)
            return f"{inner.removesuffix(')')} inside {address})" if inner else None
    label = next((label for network, label in _NON_PUBLIC_NETWORKS if address in network), None)
    if label is None and (address.is_multicast or address.is_reserved or not address.is_global):
        label = "non-public"
    if label is None or (label == "loopback" and allow_loopback):
        return None
    article = "an" if label[0] in "aeiou" else "a"
    return f"{article} {label} address ({address})"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address routes to (mapped, 6to4, NAT64), judged by that."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _parse_ipv4_like(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` the way inet_aton and browsers do, or None when it is a DNS name.

    ``127.1``, ``0x7f.1``, ``0177.0.0.1`` and ``2130706433`` all dial 127.0.0.1, so they
    must be judged as that address. As in the WHATWG URL standard, a host whose last label
    is numeric is an address or invalid, never a name to look up.
    """
    if _DOTTED_DECIMAL.fullmatch(host):  # the usual spelling, four octets: no label by label parse
        first, second, third, fourth = host.split(".")
        return ipaddress.IPv4Address(int(first) << 24 | int(second) << 16 | int(third) << 8 | int(fourth))
    labels = host.split(".")
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        raise _RefusalError(f"host {host!r} is neither a valid IPv4 address nor a host name")
    numbers = [_parse_ipv4_number(label, host) for label in labels]
    *leading, last = numbers
    if any(number > 0xFF for number in leading) or last >= 256 ** (5 - len(numbers)):
        raise _RefusalError(f"host {host!r} is out of range for an IPv4 address")
    value = last
    for position, number in enumerate(leading):
        value += number << (8 * (3 - position))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_number(label: str, host: str) -> int:
    try:
        if label[:2].lower() == "0x":
            return int(label[2:] or "0", 16)
        if len(label) > 1 and label.startswith("0"):
            return int(label[1:], 8)
        return int(label, 10)
    except ValueError:
        raise _RefusalError(f"host {host!r} is neither a valid IPv4 address nor a host name") from None


def _check_host_name(host: str, *, allow_loopback: bool) -> None:
    """Refuse names that lead to the platform itself rather than the internet."""
    if allow_loopback and (host in _LOOPBACK_NAMES or host.endswith(".localhost")):
        return
    if host in _BLOCKED_HOST_NAMES or host.endswith(_BLOCKED_HOST_SUFFIXES):
        raise _RefusalError(f"host {host!r} is an internal name")
    if "." not in host:
        raise _RefusalError(f"host {host!r} is a single-label (internal) name")


# --------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _HttpTarget:
    """An http(s) URL that passed the static checks, split the way the request needs it."""

    url: str
    scheme: str
    host: str  # ASCII, lower case, no brackets, no trailing dot
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # set when the host is a literal
    port: int
    target: str  # path and query, percent-encoded ASCII

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.address, ipaddress.IPv6Address) else self.host
        return host if self.port == _HTTP_DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _parse_http_url(url: str, *, allow_loopback: bool) -> _HttpTarget:
    """Static checks of an http(s) URL: everything that can be decided without DNS."""
    parts, scheme, host, address, port = _checked_http_parts(url, allow_loopback=allow_loopback)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    return _HttpTarget(
        url=url,
        scheme=scheme,
        host=host,
        address=address,
        port=port or _HTTP_DEFAULT_PORTS[scheme],
        target=f"{path}?{query}" if query else path,
    )


def _checked_http_parts(
    url: str, *, allow_loopback: bool
) -> tuple[SplitResult, str, str, ipaddress.IPv4Address | ipaddress.IPv6Address | None, int | None]:
    """The checks of ``_parse_http_url`` without building the request target: task creation
    (``check_input_url``) only needs the verdict, a download needs the target too."""
    if not url:
        raise _RefusalError("URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise _RefusalError(f"URL is longer than {MAX_URL_LENGTH} characters")
    if _URL_FORBIDDEN_CHARS.search(url):
        raise _RefusalError(
            "URL contains whitespace, control characters or a backslash (percent-encode them, e.g. %20)"
        )
    if not url.isascii() and not _is_utf8_encodable(url):
        # JSON's \ud800 escapes decode to lone surrogates, which no request can carry.
        raise _RefusalError("URL holds a lone surrogate (invalid Unicode); percent-encode its UTF-8 bytes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _RefusalError(f"URL is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _HTTP_DEFAULT_PORTS:
        raise _RefusalError(f"scheme {scheme or '(none)'!r} is not allowed; use http, https or data")
    if "@" in parts.netloc:
        raise _RefusalError("URL must not contain credentials (user:password@)")
    if port == 0:
        raise _RefusalError("port 0 is not allowed")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise _RefusalError("URL has no host")
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    if parts.netloc.startswith("["):
        if "%" in raw_host:
            raise _RefusalError("IPv6 zone identifiers are not allowed")
        try:
            address = ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise _RefusalError(f"host [{raw_host}] is not a valid IPv6 address") from None
        host = str(address)
    else:
        host = _ascii_host(raw_host)
        address = _parse_ipv4_like(host)
        if address is None:
            _check_host_name(host, allow_loopback=allow_loopback)
        else:
            host = str(address)
    if address is not None:
        reason = _address_refusal(address, allow_loopback=allow_loopback)
        if reason:
            raise _RefusalError(f"host is {reason}")
    return parts, scheme, host, address, port


def _is_utf8_encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _ascii_host(raw_host: str) -> str:
    """Lower-case ASCII form (IDNA) of a host name, so look-alike spellings compare equal."""
    host = raw_host.lower().removesuffix(".")
    try:
        # IDNA also folds full-width digits and dots into ASCII.
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise _RefusalError(f"host {raw_host!r} is not a valid host name") from None
    if not ascii_host or not _HOST_NAME_CHARS.fullmatch(ascii_host):
        raise _RefusalError(f"host {raw_host!r} is not a valid host name")
    return ascii_host


def _decode_data_url(url: str, *, max_bytes: int) -> tuple[str, bytes]:
    """``(media_type, payload)`` of a base64 ``data:`` URL holding an image or video."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise _RefusalError("data: URL is malformed; expected data:<image or video type>;base64,<data>")
    media_type = match["media_type"].lower()
    params = [param.strip().lower() for param in match["params"].split(";") if param.strip()]
    if not media_type.startswith(("image/", "video/")):
        raise _RefusalError(
            f"data: URL media type {media_type!r} is not an image or video", "unsupported_media"
        )
    if "base64" not in params:
        raise _RefusalError("data: URL must be base64-encoded (;base64,)")
    encoded = match["payload"]
    # Four characters carry three bytes: refuse before decoding a huge payload.
    if len(encoded) // 4 * 3 > max_bytes + 2:
        raise _RefusalError(f"data: URL payload is larger than {max_bytes} bytes", "input_too_large")
    if not encoded or len(encoded) % 4 or not _BASE64_CHARS.fullmatch(encoded):
        raise _RefusalError("data: URL payload is not valid base64")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise _RefusalError("data: URL payload is not valid base64") from None
    if len(payload) > max_bytes:
        raise _RefusalError(f"data: URL payload is larger than {max_bytes} bytes", "input_too_large")
    return media_type, payload


def _is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


is_data_url = _is_data_url


def data_url_payload(value: str, *, field: str, max_bytes: int) -> tuple[str, bytes]:
    """``(media_type, payload)`` of a ``data:`` input already passed by check_input_url."""
    try:
        return _decode_data_url(value, max_bytes=max_bytes)
    except _RefusalError as refusal:
        raise ValidationFailed(field, refusal.reason, code=refusal.code) from None


def check_input_url(
    value: str,
    *,
    field: str,
    allow_loopback: bool = False,
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> None:
    """Refuse an input URL at task creation, before anything is queued; no network is used.

    Passing this check does not make a URL safe to fetch: its host may resolve to a
    private address later. ``SafeFetcher`` checks again, with DNS, at download time.
    Raises ``ValidationFailed(field, reason, code=...)`` with code ``unsafe_url``,
    ``unsupported_media`` or ``input_too_large``.
    """
    try:
        if _is_data_url(value):
            _, payload = _decode_data_url(value, max_bytes=max_bytes)
            _sniff_or_refuse(payload)
        else:
            _checked_http_parts(value, allow_loopback=allow_loopback)
    except _RefusalError as refusal:
        raise ValidationFailed(field, refusal.reason, code=refusal.code) from None


def _sniff_or_refuse(payload: bytes) -> None:
    from shared.media import sniff_kind  # PIL and filetype: only once a data: URL is checked

    try:
        sniff_kind(payload)
    except UnsafeInput as exc:
        raise _RefusalError(exc.message, exc.code) from None
