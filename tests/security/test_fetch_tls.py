"""HTTPS through a pinned address: the socket goes to the checked IP, TLS still checks the name.

A real TLS server on 127.0.0.1 holds a certificate for ``images.example.test`` from a CA made
here; the scripted resolver maps that name to 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.errors import JobFailed
from shared.safe_fetch import SafeFetcher
from tests.security.support import DialGuard, LocalHttpServer, ScriptedResolver, run

FIELD = "task_data.source_url"
SERVER_NAME = "images.example.test"


@dataclass
class TlsServer:
    server: LocalHttpServer
    client_context: ssl.SSLContext
    sni_names: list[str | None]


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: str,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A throwaway CA and a leaf certificate for SERVER_NAME: (cert file, key file, CA PEM)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("ComfySwap test CA", ca_key.public_key(), "ComfySwap test CA", ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = _certificate(SERVER_NAME, leaf_key.public_key(), "ComfySwap test CA", ca_key, ca=False)
    folder = tmp_path_factory.mktemp("tls")
    cert_path = folder / "server.pem"
    key_path = folder / "server.key"
    cert_path.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path, ca_cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@pytest.fixture
def tls_server(tls_material: tuple[Path, Path, str]) -> Iterator[TlsServer]:
    cert_path, key_path, ca_pem = tls_material
    sni_names: list[str | None] = []
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)

    def record_sni(_socket: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        sni_names.append(name)

    server_context.sni_callback = record_sni
    server = LocalHttpServer(tls_context=server_context).start()
    yield TlsServer(server, ssl.create_default_context(cadata=ca_pem), sni_names)
    server.stop()


def test_https_connects_to_the_pinned_address_and_verifies_the_name(
    tls_server: TlsServer,
    make_fetcher: Callable[..., SafeFetcher],
    resolver: ScriptedResolver,
    dial_guard: DialGuard,
    dest_dir: Path,
    jpeg_bytes: bytes,
) -> None:
    resolver.add(SERVER_NAME, ["127.0.0.1"])
    url = tls_server.server.url("/face.jpg", host=SERVER_NAME, scheme="https")
    tls_server.server.serve("/face.jpg", jpeg_bytes)
    fetcher = make_fetcher(allow_loopback=True, ssl_context=tls_server.client_context)

    fetched = run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert fetched.content_type == "image/jpeg"
    assert dial_guard.attempts == [("127.0.0.1", tls_server.server.port)]
    assert tls_server.sni_names == [SERVER_NAME]
    assert tls_server.server.requests[0][1]["Host"] == f"{SERVER_NAME}:{tls_server.server.port}"


def test_https_refuses_a_certificate_for_another_name(
    tls_server: TlsServer,
    make_fetcher: Callable[..., SafeFetcher],
    resolver: ScriptedResolver,
    dest_dir: Path,
) -> None:
    """Pinning must not turn verification off: the name in the URL is what the certificate must match."""
    resolver.add("other.example.test", ["127.0.0.1"])
    url = tls_server.server.url("/face.jpg", host="other.example.test", scheme="https")
    fetcher = make_fetcher(allow_loopback=True, ssl_context=tls_server.client_context)

    with pytest.raises(JobFailed) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "input_unreachable"
    assert caught.value.retryable is False
    assert "certificate" in caught.value.message
    assert tls_server.server.requests == []


def test_https_uses_verifying_defaults(
    tls_server: TlsServer,
    make_fetcher: Callable[..., SafeFetcher],
    resolver: ScriptedResolver,
    dest_dir: Path,
) -> None:
    """Without an injected context the public CA bundle is used, so a private CA is not trusted."""
    resolver.add(SERVER_NAME, ["127.0.0.1"])
    url = tls_server.server.url("/face.jpg", host=SERVER_NAME, scheme="https")

    with pytest.raises(JobFailed, match="certificate"):
        run(make_fetcher(allow_loopback=True).fetch_to_file(url, dest_dir, field=FIELD))
