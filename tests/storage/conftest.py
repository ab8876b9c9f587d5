"""Real servers for the storage suite: fake-gcs-server, moto's S3 server, the CF Images fake.

Each starts once per session on 127.0.0.1 (comfyswap.emulators: own process group, log to a
file, bounded wait) and is stopped by its PID. Tests keep apart by unique keys and
buckets, never by resetting a server. A missing binary skips its tests with the reason.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfyswap.emulators import (
    EmulatorProcess,
    EmulatorUnavailable,
    create_gcs_bucket,
    create_s3_bucket,
    s3_client,
    start_fake_gcs_server,
    start_moto_server,
)

# Re-exported: benchmarks/storage.py looks the binaries up through this module.
from comfyswap.emulators import fake_gcs_server_binary as fake_gcs_server_binary
from comfyswap.emulators import moto_server_binary as moto_server_binary
from shared.settings import Settings
from tests.fakes.cf_images_fake import CloudflareImagesFake

GCS_PROJECT = "comfyswap-test"
R2_ACCESS_KEY = "test-access-key"
R2_SECRET_KEY = "test-secret-key"


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def _emulator(start: Callable[[Path], EmulatorProcess], logs: Path) -> Iterator[EmulatorProcess]:
    """An emulator for the session, stopped at its end; the tests are skipped without it."""
    try:
        server = start(logs)
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs(server_logs: Path) -> Iterator[EmulatorProcess]:
    yield from _emulator(start_fake_gcs_server, server_logs)


@pytest.fixture(scope="session")
def moto_s3(server_logs: Path) -> Iterator[EmulatorProcess]:
    yield from _emulator(start_moto_server, server_logs)


@pytest.fixture(scope="session")
def cf_images_fake() -> Iterator[CloudflareImagesFake]:
    with CloudflareImagesFake() as fake:
        yield fake


@pytest.fixture(scope="session")
def local_results_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Serves DATA_DIR/results over HTTP, as the runner does for `local` result URLs."""
    data_dir = tmp_path_factory.mktemp("data")
    results = data_dir / "results"
    results.mkdir()
    handler = partial(_QuietFileHandler, directory=str(results))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield data_dir, f"http://127.0.0.1:{server.server_address[1]}/results"
    server.shutdown()
    server.server_close()


class _QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path: str) -> str:
        return super().translate_path(path.removeprefix("/results"))

    def log_message(self, format: str, *args: object) -> None:  # stdlib signature
        return


@pytest.fixture(scope="session")
def service_account_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A service-account key made here (never a real one), so v4 URLs can be signed offline."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key = {
        "type": "service_account",
        "project_id": GCS_PROJECT,
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": f"runner@{GCS_PROJECT}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path = tmp_path_factory.mktemp("credentials") / "service-account.json"
    path.write_text(json.dumps(key))
    return path


def new_gcs_bucket(fake_gcs: EmulatorProcess) -> str:
    name = f"results-{uuid.uuid4().hex[:12]}"
    create_gcs_bucket(fake_gcs.url, name, project=GCS_PROJECT)
    return name


def s3_admin_client(moto_s3: EmulatorProcess) -> Any:
    return s3_client(moto_s3.url, R2_ACCESS_KEY, R2_SECRET_KEY)


def new_r2_bucket(moto_s3: EmulatorProcess) -> str:
    name = f"results-{uuid.uuid4().hex[:12]}"
    create_s3_bucket(moto_s3.url, name, access_key=R2_ACCESS_KEY, secret_key=R2_SECRET_KEY)
    return name


def storage_settings(**overrides: object) -> Settings:
    """Settings for one test, built with kwargs (what the test depends on is named)."""
    return Settings(**overrides)  # type: ignore[arg-type]  # kwargs checked by pydantic at run time


def png_file(directory: Path, *, seed: int) -> tuple[Path, bytes]:
    """A small real PNG; different seeds give different bytes (to tell versions apart)."""
    image = Image.frombytes("RGB", (32, 32), hashlib.sha256(str(seed).encode()).digest() * 96)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = directory / f"result-{seed}.png"
    path.write_bytes(buffer.getvalue())
    return path, buffer.getvalue()
