"""What needs no server: result URL forms, how GCS signs, configuration errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.errors import UpstreamUnavailable
from shared.storage.gcs import GCSStorage
from shared.storage.r2 import R2Storage


def test_gcs_public_url_is_the_storage_googleapis_host() -> None:
    provider = GCSStorage("results-bucket")

    assert provider.public_url("results/t 1/000.png") == (
        "https://storage.googleapis.com/results-bucket/results/t%201/000.png"
    )


def test_gcs_public_url_uses_the_emulator_host_when_set() -> None:
    provider = GCSStorage("results-bucket", emulator_host="http://127.0.0.1:4443/")

    assert (
        provider.public_url("results/t/000.png") == "http://127.0.0.1:4443/results-bucket/results/t/000.png"
    )


def test_gcs_signs_through_iam_when_credentials_hold_no_key() -> None:
    # Cloud Run's runtime credentials: a token and an email, no private key.
    provider = GCSStorage("results-bucket", signed_urls=True)
    provider._signing_credentials = SimpleNamespace(  # type: ignore[assignment]
        valid=True, token="access-token", service_account_email="runner@project.iam.gserviceaccount.com"
    )

    assert provider._signing_arguments() == {
        "service_account_email": "runner@project.iam.gserviceaccount.com",
        "access_token": "access-token",
    }


def test_gcs_signed_urls_without_any_credentials_is_a_configuration_error() -> None:
    provider = GCSStorage("results-bucket", signed_urls=True)

    with pytest.raises(UpstreamUnavailable) as caught:
        provider._signing_arguments()

    assert caught.value.code == "storage_not_configured"
    assert caught.value.retryable is False


def test_gcs_chunk_size_must_fit_resumable_uploads() -> None:
    with pytest.raises(ValueError, match="256 KiB"):
        GCSStorage("results-bucket", chunk_size=1000)


def test_r2_endpoint_comes_from_the_account_id() -> None:
    provider = R2Storage("results", account_id="abc123", access_key="k", secret_key="s")

    assert provider.endpoint_url == "https://abc123.r2.cloudflarestorage.com"


def test_r2_public_domain_gives_a_public_url_without_a_client() -> None:
    provider = R2Storage("results", account_id="abc123", public_domain="https://cdn.example.com/")

    assert provider.url_for("results/t/000.png") == "https://cdn.example.com/results/t/000.png"
    assert provider._client.built is None


def test_r2_signed_urls_win_over_the_public_domain() -> None:
    provider = R2Storage(
        "results",
        account_id="abc123",
        access_key="key",
        secret_key="secret",
        public_domain="cdn.example.com",
        signed_urls=True,
        signed_url_ttl_s=600,
    )

    url = provider.url_for("results/t/000.png")

    assert url.startswith("https://abc123.r2.cloudflarestorage.com/results/results/t/000.png?")
    assert "X-Amz-Expires=600" in url


def test_gcs_missing_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    provider = GCSStorage("results-bucket", credentials_file=str(tmp_path / "missing.json"))
    result = tmp_path / "000.png"
    result.write_bytes(b"\x89PNG\r\n\x1a\n")

    with pytest.raises(UpstreamUnavailable) as caught:
        provider.upload_file(result, "results/t/000.png", "image/png")

    assert caught.value.code == "storage_not_configured"
    assert caught.value.retryable is False
