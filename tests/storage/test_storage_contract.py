"""One contract, every provider: what the runner relies on when it stores a result.

Each provider is built the way the runner builds it (``make_provider`` from settings)
and talks to a real server over the real protocol: local files behind an HTTP server,
fake-gcs-server, moto's S3 server, and the Cloudflare Images fake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from shared.storage import StorageProvider, make_provider, result_key
from tests.storage.conftest import (
    GCS_PROJECT,
    R2_ACCESS_KEY,
    R2_SECRET_KEY,
    new_gcs_bucket,
    new_r2_bucket,
    png_file,
    s3_admin_client,
    storage_settings,
)

pytestmark = pytest.mark.emulator

ALL_PROVIDERS = ["local", "gcs", "r2", "cf_images"]


@dataclasses.dataclass
class Backend:
    """A provider under test plus a way to count what it really stored."""

    name: str
    provider: StorageProvider
    count_objects: Callable[[str], int]
    server_log: Callable[[], str] = lambda: ""
    bucket: str = ""


def build_backend(name: str, request: pytest.FixtureRequest, *, signed_urls: bool = False) -> Backend:
    if name == "local":
        data_dir, base_url = request.getfixturevalue("local_results_server")
        settings = storage_settings(data_dir=data_dir, local_storage_base_url=base_url)
        root = data_dir / "results"
        return Backend(
            name,
            make_provider("local", settings),
            lambda prefix: sum(
                1 for path in root.rglob("*") if path.is_file() and _under(root, path, prefix)
            ),
        )
    if name == "gcs":
        fake_gcs = request.getfixturevalue("fake_gcs")
        bucket = new_gcs_bucket(fake_gcs)
        settings = storage_settings(
            gcs_bucket_name=bucket,
            storage_emulator_host=fake_gcs.url,
            google_cloud_project=GCS_PROJECT,
            signed_urls=signed_urls,
            google_application_credentials=str(request.getfixturevalue("service_account_key_file")),
        )
        provider = make_provider("gcs", settings)

        def count_gcs(prefix: str) -> int:
            return len(list(provider.client.list_blobs(bucket, prefix=prefix)))  # type: ignore[attr-defined]

        return Backend(name, provider, count_gcs, fake_gcs.log, bucket)
    if name == "r2":
        moto_s3 = request.getfixturevalue("moto_s3")
        bucket = new_r2_bucket(moto_s3)
        settings = storage_settings(
            r2_bucket_name=bucket,
            r2_endpoint_url=moto_s3.url,
            r2_access_key=R2_ACCESS_KEY,
            r2_secret_key=R2_SECRET_KEY,
            signed_urls=signed_urls,
        )
        admin = s3_admin_client(moto_s3)

        def count_r2(prefix: str) -> int:
            return int(admin.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"])

        return Backend(name, make_provider("r2", settings), count_r2, moto_s3.log, bucket)
    if name == "cf_images":
        fake = request.getfixturevalue("cf_images_fake")
        settings = storage_settings(
            cf_images_account_id=fake.account_id,
            cf_images_api_token=fake.api_token,
            cf_images_api_base=fake.api_base,
        )
        return Backend(
            name,
            make_provider("cf_images", settings),
            lambda prefix: sum(
                1 for image_id in fake.images if image_id.startswith(prefix.replace("/", "~"))
            ),
        )
    raise AssertionError(name)


def _under(root: Path, path: Path, prefix: str) -> bool:
    return ("results/" + path.relative_to(root).as_posix()).startswith(prefix)


@pytest.fixture(params=ALL_PROVIDERS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return build_backend(request.param, request)


def new_key(content_type: str = "image/png") -> str:
    return result_key(uuid.uuid4().hex, 0, content_type)


def download(url: str) -> httpx.Response:
    response = httpx.get(url, timeout=30.0)
    assert response.status_code == 200, (url, response.status_code, response.text[:500])
    return response


def test_uploaded_image_is_served_at_its_url(backend: Backend, tmp_path: Path) -> None:
    path, data = png_file(tmp_path, seed=1)
    key = new_key()

    stored = backend.provider.upload_file(path, key, "image/png")

    assert (stored.provider, stored.key, stored.size, stored.content_type) == (
        backend.name,
        key,
        len(data),
        "image/png",
    )
    response = download(stored.url)
    assert response.content == data
    assert response.headers["content-type"].split(";")[0] == "image/png"


def test_same_key_twice_overwrites_and_keeps_one_object(backend: Backend, tmp_path: Path) -> None:
    first_path, _ = png_file(tmp_path, seed=2)
    second_path, second_data = png_file(tmp_path, seed=3)
    key = new_key()

    backend.provider.upload_file(first_path, key, "image/png")
    stored = backend.provider.upload_file(second_path, key, "image/png")

    assert download(stored.url).content == second_data
    assert backend.count_objects(key) == 1


def test_health_reports_configured_without_uploading(backend: Backend) -> None:
    before = backend.count_objects("results/")

    health = backend.provider.health()

    assert health["status"] == "configured", health
    assert backend.count_objects("results/") == before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gcs", "r2"])
def test_large_file_goes_up_in_chunks(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    backend = build_backend(name, request)
    path = tmp_path / "result.mp4"
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for _ in range(20):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            handle.write(chunk)
    key = new_key("video/mp4")

    stored = backend.provider.upload_file(path, key, "video/mp4")

    assert stored.size == 20 * 1024 * 1024
    received = hashlib.sha256()
    with httpx.stream("GET", stored.url, timeout=60.0) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "video/mp4"
        for chunk in response.iter_bytes():
            received.update(chunk)
    assert received.hexdigest() == digest.hexdigest()
    if name == "gcs":
        # Over 8 MB the client switches to a resumable upload sent in chunk_size pieces.
        assert "uploadType=resumable" in backend.server_log()
    else:
        # An S3 multipart object's ETag ends in -<parts>: 20 MiB in 8 MiB parts is 3.
        admin = s3_admin_client(request.getfixturevalue("moto_s3"))
        assert admin.head_object(Bucket=backend.bucket, Key=key)["ETag"].strip('"').endswith("-3")


@pytest.mark.parametrize("name", ["gcs", "r2"])
def test_signed_url_mode_serves_the_object(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    backend = build_backend(name, request, signed_urls=True)
    path, data = png_file(tmp_path, seed=4)
    key = new_key()

    stored = backend.provider.upload_file(path, key, "image/png")

    signature_parameter = "X-Goog-Signature=" if name == "gcs" else "X-Amz-Signature="
    assert signature_parameter in stored.url
    assert "X-Goog-Expires=3600" in stored.url or "X-Amz-Expires=3600" in stored.url
    # The emulators serve signed URLs but check no signatures (TESTING.md): this proves
    # the URL's shape and target, not that Google or Cloudflare would accept the signature.
    assert download(stored.url).content == data


@pytest.mark.parametrize("name", ["gcs", "r2", "cf_images"])
def test_unconfigured_provider_reports_error_without_network(name: str) -> None:
    provider = make_provider(name, storage_settings(storage_emulator_host="", r2_endpoint_url=""))

    health = provider.health()

    assert health["status"] == "error"
    assert "not" in health["reason"]
    assert provider._client.built is None  # type: ignore[attr-defined]  # no client was built
