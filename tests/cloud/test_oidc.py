"""Push-token verification, with tokens signed by a locally generated key (no network).

The key pair stands in for Google's: its certificate is served through the injected
``certs`` mapping, exactly the ``{key id: PEM certificate}`` shape Google publishes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from shared.errors import Forbidden, Unauthorized
from shared.oidc import verify_cloud_tasks_token

AUDIENCE = "https://runner-abc-uc.a.run.app"
INVOKER = "tasks-invoker@comfyswap-prod.iam.gserviceaccount.com"
KEY_ID = "test-key-1"


def _key_and_certificate(common_name: str) -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return private_pem, certificate.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def google_key() -> tuple[str, str]:
    return _key_and_certificate("google-test")


@pytest.fixture(scope="module")
def certs(google_key: tuple[str, str]) -> dict[str, str]:
    return {KEY_ID: google_key[1]}


def sign(private_pem: str, key_id: str = KEY_ID, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "sub": "1234567890",
        "email": INVOKER,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(overrides)
    claims = {name: value for name, value in claims.items() if value is not None}
    signer = crypt.RSASigner.from_string(private_pem, key_id=key_id)
    token: bytes = jwt.encode(signer, claims)
    return token.decode()


def verify(header: str | None, certs: dict[str, str]) -> dict[str, Any]:
    return verify_cloud_tasks_token(header, audience=AUDIENCE, service_account_email=INVOKER, certs=certs)


@pytest.mark.parametrize("issuer", ["https://accounts.google.com", "accounts.google.com"])
def test_a_valid_cloud_tasks_token_is_accepted(google_key, certs, issuer) -> None:
    claims = verify(f"Bearer {sign(google_key[0], iss=issuer)}", certs)

    assert claims["email"] == INVOKER
    assert claims["aud"] == AUDIENCE


def test_certs_may_come_from_a_fetcher(google_key, certs: dict[str, str]) -> None:
    calls: list[int] = []

    def fetch() -> dict[str, str]:
        calls.append(1)
        return certs

    claims = verify_cloud_tasks_token(
        f"Bearer {sign(google_key[0])}", audience=AUDIENCE, service_account_email=INVOKER, certs=fetch
    )

    assert claims["email"] == INVOKER
    assert calls == [1]


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "token-without-scheme"]
)
def test_missing_or_malformed_header_is_unauthorized(certs, header) -> None:
    with pytest.raises(Unauthorized) as raised:
        verify(header, certs)

    assert raised.value.code == "missing_token"


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"aud": "https://someone-else.example.com"}, "wrong audience"),
        ({"iss": "https://evil.example.com"}, "wrong issuer"),
        ({"iss": None}, "no issuer"),
        ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, "expired"),
    ],
)
def test_tokens_failing_a_claim_check_are_unauthorized(google_key, certs, overrides, why) -> None:
    token = sign(google_key[0], **overrides)

    with pytest.raises(Unauthorized) as raised:
        verify(f"Bearer {token}", certs)

    assert raised.value.code == "invalid_token", why


def test_a_token_signed_by_another_key_is_unauthorized(certs) -> None:
    forger_private_pem, _ = _key_and_certificate("forger")

    with pytest.raises(Unauthorized) as raised:
        verify(f"Bearer {sign(forger_private_pem)}", certs)

    assert raised.value.code == "invalid_token"


def test_a_token_whose_key_id_is_unknown_is_unauthorized(google_key, certs) -> None:
    with pytest.raises(Unauthorized):
        verify(f"Bearer {sign(google_key[0], key_id='rotated-away')}", certs)


def test_a_tampered_payload_is_unauthorized(google_key, certs) -> None:
    header, _, signature = sign(google_key[0]).split(".")
    forged_payload = sign(google_key[0], email="attacker@evil.example.com").split(".")[1]

    with pytest.raises(Unauthorized):
        verify(f"Bearer {header}.{forged_payload}.{signature}", certs)


def test_an_unsigned_token_is_unauthorized(certs) -> None:
    import base64
    import json

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "email": INVOKER, "email_verified": True}
    token = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({**claims, 'iat': now, 'exp': now + 60})}."

    with pytest.raises(Unauthorized):
        verify(f"Bearer {token}", certs)


def test_garbage_is_unauthorized(certs) -> None:
    with pytest.raises(Unauthorized):
        verify("Bearer not.a.jwt", certs)


@pytest.mark.parametrize(
    "overrides",
    [
        {"email": "someone-else@comfyswap-prod.iam.gserviceaccount.com"},
        {"email_verified": False},
        {"email_verified": None},
        {"email": None},
    ],
)
def test_a_valid_token_of_another_service_account_is_forbidden(google_key, certs, overrides) -> None:
    with pytest.raises(Forbidden) as raised:
        verify(f"Bearer {sign(google_key[0], **overrides)}", certs)

    assert raised.value.code == "wrong_service_account"


def test_empty_expectations_are_refused_rather_than_accepting_anything(google_key, certs) -> None:
    with pytest.raises(ValueError, match="required"):
        verify_cloud_tasks_token(
            f"Bearer {sign(google_key[0])}", audience="", service_account_email=INVOKER, certs=certs
        )


@contextlib.contextmanager
def serving_certs(certs: dict[str, str], hits: list[str] | None = None) -> Iterator[str]:
    """Google's certificate endpoint stood in for by a real server on 127.0.0.1: yields its
    URL; ``hits`` collects the paths requested."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = json.dumps(certs).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if hits is not None:
                hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=3600, must-revalidate")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_google_certs_are_fetched_once_per_cache_lifetime(certs: dict[str, str]) -> None:
    """The default source fetches the certificate mapping over HTTP and honours
    Cache-Control max-age (here a real server on 127.0.0.1 stands in for Google)."""
    from shared.oidc import GoogleCertsCache

    hits: list[str] = []
    with serving_certs(certs, hits) as url:
        cache = GoogleCertsCache(url)
        first = cache()
        second = cache()

    assert first == certs
    assert second == certs
    assert hits == ["/oauth2/v1/certs"]


def test_unreachable_certs_refuse_the_token_as_retryable(google_key) -> None:
    def unreachable() -> dict[str, str]:
        raise ValueError("certificate endpoint answered garbage")

    with pytest.raises(Unauthorized) as raised:
        verify_cloud_tasks_token(
            f"Bearer {sign(google_key[0])}",
            audience=AUDIENCE,
            service_account_email=INVOKER,
            certs=unreachable,
        )

    assert raised.value.code == "token_certs_unavailable"
    assert raised.value.retryable is True
