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

On Cloud Run with invoker IAM, Cloud Run itself verifies the caller's ID token (signature,
audience, run.invoker) and forwards it with the signature part replaced by
``SIGNATURE_REMOVED_BY_GOOGLE``, so the RS256 check above cannot run. Such a token is
accepted only when this process is configured for that platform (``CLOUD_RUN_INVOKER_IAM``,
set by Terraform, and Cloud Run's own ``K_SERVICE``); the claims are still checked
(issuer, audience, expiry, the invoker's email). Anywhere else (a VM, a laptop) a token
without its signature is refused: nothing upstream verified it. Reasoning: docs/deploy.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from google.auth import exceptions as google_auth_exceptions
from google.auth import jwt

from shared.errors import Forbidden, Unauthorized

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "GOOGLE_CERTS_URL",
    "GOOGLE_ISSUERS",
    "SIGNATURE_REMOVED",
    "CertsSource",
    "GoogleCertsCache",
    "authorize_reaper",
    "identity_header",
    "platform_verifies_tokens",
    "verify_cloud_tasks_token",
]

# PEM x509 certificates by key id, the format google.auth.jwt.decode takes.
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
# What Cloud Run puts in place of the signature of an ID token it verified and forwards.
SIGNATURE_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"

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
_certs_by_url: dict[str, GoogleCertsCache] = {}
_certs_lock = threading.Lock()


def certs_for(url: str) -> GoogleCertsCache:
    """One certificate cache per URL and process."""
    with _certs_lock:
        if url not in _certs_by_url:
            _certs_by_url[url] = GoogleCertsCache(url)
        return _certs_by_url[url]


def platform_verifies_tokens(settings: Settings) -> bool:
    """Cloud Run verified the caller's ID token before this process saw the request.

    Both are needed: the explicit setting (Terraform sets it where invoker IAM is on) and
    Cloud Run's own K_SERVICE. A VM or a laptop with the setting copied by mistake has no
    K_SERVICE, and a Cloud Run service deployed without the setting may allow
    unauthenticated calls, so neither alone is enough."""
    return bool(settings.cloud_run_invoker_iam and settings.k_service)


def identity_header(headers: Mapping[str, str] | Any) -> str | None:
    """The header carrying the caller's ID token. A caller may authenticate to Cloud Run
    with ``X-Serverless-Authorization`` instead; Cloud Run then checks that one and passes
    ``Authorization`` through untouched, so the latter proves nothing."""
    serverless: str | None = headers.get("X-Serverless-Authorization")
    if serverless:
        return serverless
    authorization: str | None = headers.get("Authorization")
    return authorization


def verify_cloud_tasks_token(
    authorization_header: str | None,
    *,
    audience: str,
    service_account_email: str,
    certs: CertsSource | None = None,
    platform_verified: bool = False,
) -> dict[str, Any]:
    """The verified claims of the ``Authorization: Bearer <ID token>`` of a push request.

    Raises Unauthorized when the header is missing or the token cannot be verified
    (signature, issuer, audience, expiry), Forbidden when it is a valid Google token for
    another service account. ``certs`` defaults to Google's published certificates.
    ``platform_verified``: Cloud Run checked the token already (platform_verifies_tokens),
    so a token whose signature it removed is accepted on its claims.
    """
    if not audience or not service_account_email:
        # Fail closed: an empty expectation would accept any audience or any account.
        raise ValueError("audience and service_account_email are required to verify a push token")
    token = _bearer_token(authorization_header)
    if token.count(".") == 2 and token.rsplit(".", 1)[1] == SIGNATURE_REMOVED:
        if not platform_verified:
            raise Unauthorized(
                "the token's signature was removed, as Cloud Run does after verifying it, but this "
                "process is not configured to rely on Cloud Run's check (CLOUD_RUN_INVOKER_IAM on Cloud Run)",
                code="signature_removed",
            )
        forwarded = _unverified_claims(token)
        _check_claims(forwarded, audience=audience)
        return _check_account(forwarded, service_account_email)
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
    return _check_account(claims, service_account_email)


def authorize_reaper(headers: Mapping[str, str] | Any, settings: Settings) -> None:
    """POST /internal/reap: Cloud Scheduler's OIDC token when REAPER_INVOKER_EMAIL is set
    (the deployed case: no API key in the job), else an admin API key (local runs)."""
    if not settings.reaper_invoker_email:
        from shared.auth import authenticate

        authenticate(headers, settings).require_admin()
        return
    verify_cloud_tasks_token(
        identity_header(headers),
        audience=settings.reaper_oidc_audience,
        service_account_email=settings.reaper_invoker_email,
        certs=certs_for(settings.google_oidc_certs_url),
        platform_verified=platform_verifies_tokens(settings),
    )


def _unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT whose signature someone else checked."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise Unauthorized(f"invalid push token: {exc}", code="invalid_token") from exc
    if not isinstance(claims, dict):
        raise Unauthorized("invalid push token: the payload is not a JSON object", code="invalid_token")
    return claims


def _check_claims(claims: Mapping[str, Any], *, audience: str) -> None:
    """What jwt.decode checks besides the signature: audience, issuer, iat and exp."""
    now = time.time()
    if claims.get("aud") != audience:
        raise Unauthorized(
            f"push token for audience {claims.get('aud')!r}, not this service", code="invalid_token"
        )
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise Unauthorized(f"push token issued by {claims.get('iss')!r}, not Google", code="invalid_token")
    expires, issued = claims.get("exp"), claims.get("iat")
    if not isinstance(expires, int | float) or not isinstance(issued, int | float):
        raise Unauthorized("push token without exp/iat", code="invalid_token")
    if expires < now - _CLOCK_SKEW_S:
        raise Unauthorized("push token expired", code="invalid_token")
    if issued > now + _CLOCK_SKEW_S:
        raise Unauthorized("push token issued in the future", code="invalid_token")


def _check_account(claims: dict[str, Any], service_account_email: str) -> dict[str, Any]:
    if claims.get("email") != service_account_email or claims.get("email_verified") is not True:
        raise Forbidden(
            f"token belongs to {claims.get('email')!r}, not the expected invoker account",
            code="wrong_service_account",
            details={"email": claims.get("email")},
        )
    return claims


def _bearer_token(authorization_header: str | None) -> str:
    scheme, _, token = (authorization_header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Cloud Tasks sends an OIDC token)", code="missing_token")
    return token.strip()
