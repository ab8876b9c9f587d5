"""The fallback chain and the registry: a dead provider must not lose a finished result."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shared.errors import UpstreamUnavailable
from shared.storage import make_provider, make_storage_chain, result_key
from shared.storage.cf_images import MAX_IMAGE_BYTES
from shared.storage.chain import StorageChain
from shared.storage.local import LocalStorage
from tests.fakes.cf_images_fake import CloudflareImagesFake
from tests.servers import free_port
from tests.storage.conftest import png_file, storage_settings


def closed_port_url() -> str:
    """A loopback URL nobody listens on: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def dead_gcs_settings(tmp_path: Path, **overrides: object) -> dict[str, object]:
    return {
        "storage_provider": "gcs",
        "gcs_bucket_name": "results",
        "storage_emulator_host": closed_port_url(),
        "storage_retry_deadline_s": 0.5,
        "data_dir": tmp_path / "data",
        "local_storage_base_url": "http://127.0.0.1:8080/results",
        **overrides,
    }


def test_dead_primary_falls_back_and_records_the_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chain = make_storage_chain(storage_settings(**dead_gcs_settings(tmp_path, storage_fallback="local")))
    path, data = png_file(tmp_path, seed=20)
    key = result_key(uuid.uuid4().hex, 0, "image/png")

    with caplog.at_level(logging.WARNING, logger="shared.storage.chain"):
        stored = chain.upload(path, key, "image/png")

    assert stored.provider == "local"
    assert (tmp_path / "data" / "results" / key.removeprefix("results/")).read_bytes() == data
    [attempt] = stored.extra["tried"]
    assert attempt["provider"] == "gcs"
    assert attempt["code"] == "storage_upload_failed"
    assert "unreachable" in attempt["error"]
    [record] = [
        record for record in caplog.records if getattr(record, "event", "") == "storage_provider_failed"
    ]
    assert record.provider == "gcs"  # type: ignore[attr-defined]  # set through log extra


def test_every_provider_down_raises_storage_unavailable_with_each_error(tmp_path: Path) -> None:
    settings = storage_settings(
        **dead_gcs_settings(
            tmp_path,
            storage_fallback="r2,cf_images",
            r2_bucket_name="results",
            r2_endpoint_url=closed_port_url(),
            r2_access_key="key",
            r2_secret_key="secret",
            cf_images_account_id="acct",
            cf_images_api_token="token",
            cf_images_api_base=closed_port_url() + "/client/v4",
        )
    )
    chain = make_storage_chain(settings)
    path, _ = png_file(tmp_path, seed=21)

    with pytest.raises(UpstreamUnavailable) as caught:
        chain.upload(path, result_key("t", 0, "image/png"), "image/png")

    error = caught.value
    assert error.code == "storage_unavailable"
    assert error.retryable is True
    assert [entry["provider"] for entry in error.details["errors"]] == ["gcs", "r2", "cf_images"]
    assert all(entry["details"]["status"] is None for entry in error.details["errors"])
    assert json.dumps(error.to_dict())  # the task's error field must serialise


def test_video_skips_cloudflare_images_and_says_so(
    cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    settings = storage_settings(
        storage_provider="cf_images",
        storage_fallback="local",
        cf_images_account_id=cf_images_fake.account_id,
        cf_images_api_token=cf_images_fake.api_token,
        cf_images_api_base=cf_images_fake.api_base,
        data_dir=tmp_path / "data",
    )
    video = tmp_path / "result.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)

    stored = make_storage_chain(settings).upload(video, result_key("t", 0, "video/mp4"), "video/mp4")

    assert stored.provider == "local"
    assert stored.extra["tried"] == [{"provider": "cf_images", "skipped": "does not accept video/mp4"}]


def test_oversized_image_moves_from_cloudflare_images_to_the_next_provider(
    cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    cf_images = make_provider(
        "cf_images",
        storage_settings(
            cf_images_account_id=cf_images_fake.account_id,
            cf_images_api_token=cf_images_fake.api_token,
            cf_images_api_base=cf_images_fake.api_base,
        ),
    )
    chain = StorageChain(
        [cf_images, LocalStorage(tmp_path / "results", "http://127.0.0.1:8080/results", signing_key=b"k")]
    )
    _, data = png_file(tmp_path, seed=22)
    big = tmp_path / "big.png"
    big.write_bytes(data + b"\x00" * MAX_IMAGE_BYTES)

    stored = chain.upload(big, result_key("t", 0, "image/png"), "image/png")

    assert stored.provider == "local"
    assert stored.extra["tried"][0]["code"] == "cf_images_too_large"


def test_no_provider_for_the_type_is_not_retryable(
    cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    settings = storage_settings(
        storage_provider="cf_images",
        cf_images_account_id=cf_images_fake.account_id,
        cf_images_api_token=cf_images_fake.api_token,
        cf_images_api_base=cf_images_fake.api_base,
    )
    video = tmp_path / "result.mp4"
    video.write_bytes(b"\x00" * 16)

    with pytest.raises(UpstreamUnavailable) as caught:
        make_storage_chain(settings).upload(video, result_key("t", 0, "video/mp4"), "video/mp4")

    assert caught.value.code == "storage_unavailable"
    assert caught.value.retryable is False


def test_chain_names_follow_provider_then_fallback_once_each(tmp_path: Path) -> None:
    settings = storage_settings(
        storage_provider="r2", storage_fallback="gcs,r2,local", data_dir=tmp_path / "data"
    )

    chain = make_storage_chain(settings)

    assert chain.provider_names == ["r2", "gcs", "local"]


def test_chain_health_lists_every_provider(tmp_path: Path) -> None:
    settings = storage_settings(storage_provider="gcs", storage_fallback="local", data_dir=tmp_path / "data")

    health = make_storage_chain(settings).health()

    assert health["status"] == "configured"  # local still works
    assert [report["provider"] for report in health["providers"]] == ["gcs", "local"]
    assert health["providers"][0]["status"] == "error"


def test_unknown_provider_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown storage provider"):
        make_provider("s3", storage_settings(data_dir=tmp_path))


# Each checked in a fresh interpreter: what importing storage (or building a provider) loads.
LAZY_SDKS = {
    "importing storage imports no cloud SDK": (
        "import sys, shared.storage, shared.storage.chain;"
        "heavy = [m for m in ('boto3', 'botocore', 'google.cloud.storage') if m in sys.modules];"
        "assert not heavy, heavy"
    ),
    "building the R2 provider defers boto3 until first use": (
        "import sys; from shared.settings import Settings; from shared.storage import make_provider;"
        "make_provider('r2', Settings(r2_bucket_name='b', r2_account_id='a'));"
        "assert 'boto3' not in sys.modules"
    ),
}


@pytest.mark.parametrize("code", LAZY_SDKS.values(), ids=LAZY_SDKS.keys())
def test_cloud_sdks_load_only_when_used(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=60)
