"""Verify the OIDC token Cloud Tasks attaches to a push delivery (DESIGN.md §8).

The runner's push endpoint must run tasks only for Cloud Tasks acting as our invoker
service account. A Google-signed ID token proves that when all of these hold: the RS256
signature matches one of Google's current certificates, the issuer is Google, the
audience is this runner, it has not expired, and ``email`` is the invoker service
account with ``email_verified``. Anything unverifiable is 401 (Unauthorized); a genuine
token for another account is 403 (Forbidden), so a misconfigured caller can tell the two
apart in its logs.

Google's certificates are fetched over HTTPS and cached for as long as the response's
``Cache-Control: max-age`` allows; tests inject a mapping or a fetcher instead.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from google.auth import exceptions as google_auth_exceptions
from google.auth import jwt

from shared.errors import Forbidden, Unauthorized

__all__ = [
    "GOOGLE_CERTS_URL",
    "GOOGLE_ISSUERS",
    "CertsSource",
    "GoogleCertsCache",
    "verify_cloud_tasks_token",
]

# PEM x509 certificates by key id, the format google.auth.jwt.decode takes.
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})

CertsSource = Mapping[str, str] | Callable[[], Mapping[str, str]]

_MAX_AGE = re.compile(r"max-age=(\d+)")
# Tolerated difference between our clock and Google's when checking iat/exp.
_CLOCK_SKEW_S = 10


class GoogleCertsCache:
    """Google's signing certificates, fetched on demand and cached per Cache-Control.

    One instance per process: the certificates rotate daily, and every push delivery
    would otherwise cost a round trip to Google.
    """

    def __init__(
        self, certs_url: str = GOOGLE_CERTS_URL, *, timeout_s: float = 10.0, default_ttl_s: float = 300.0
    ) -> None:
        self._certs_url = certs_url
        self._timeout_s = timeout_s
        self._default_ttl_s = default_ttl_s
        self._lock = threading.Lock()
        self._certs: Mapping[str, str] = {}
        self._expires_at = 0.0

    def __call__(self) -> Mapping[str, str]:
        with self._lock:
            if time.monotonic() >= self._expires_at:
                response = httpx.get(self._certs_url, timeout=self._timeout_s)
                response.raise_for_status()
                match = _MAX_AGE.search(response.headers.get("cache-control", ""))
                ttl_s = float(match.group(1)) if match else self._default_ttl_s
                self._certs = dict(response.json())
                self._expires_at = time.monotonic() + ttl_s
            return self._certs


_default_certs = GoogleCertsCache()


def verify_cloud_tasks_token(
    authorization_header: str | None,
    *,
    audience: str,
    service_account_email: str,
    certs: CertsSource | None = None,
) -> dict[str, Any]:
    """The verified claims of the ``Authorization: Bearer <ID token>`` of a push request.

    Raises Unauthorized when the header is missing or the token cannot be verified
    (signature, issuer, audience, expiry), Forbidden when it is a valid Google token for
    another service account. ``certs`` defaults to Google's published certificates.
    """
    if not audience or not service_account_email:
        # Fail closed: an empty expectation would accept any audience or any account.
        raise ValueError("audience and service_account_email are required to verify a push token")
    token = _bearer_token(authorization_header)
    try:
        certificates = certs() if callable(certs) else certs
        if certificates is None:
            certificates = _default_certs()
    except (httpx.HTTPError, ValueError) as exc:
        raise Unauthorized(
            "cannot fetch Google's token certificates to verify the push token",
            code="token_certs_unavailable",
            retryable=True,
        ) from exc
    try:
        claims: dict[str, Any] = dict(
            jwt.decode(token, certs=certificates, audience=audience, clock_skew_in_seconds=_CLOCK_SKEW_S)  # type: ignore[no-untyped-call]  # google-auth lacks hints here
        )
    except (google_auth_exceptions.GoogleAuthError, ValueError) as exc:
        raise Unauthorized(f"invalid push token: {exc}", code="invalid_token") from exc
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise Unauthorized(f"push token issued by {claims.get('iss')!r}, not Google", code="invalid_token")
    if claims.get("email") != service_account_email or claims.get("email_verified") is not True:
        raise Forbidden(
            f"push token belongs to {claims.get('email')!r}, not the Cloud Tasks invoker",
            code="wrong_service_account",
            details={"email": claims.get("email")},
        )
    return claims


def _bearer_token(authorization_header: str | None) -> str:
    scheme, _, token = (authorization_header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Cloud Tasks sends an OIDC token)", code="missing_token")
    return token.strip()
