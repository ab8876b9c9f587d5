"""Cloudflare Images specifics: images only, 10 MB, deterministic ids, errors with context.

Run against the fake of the documented v1 API (tests/fakes/cf_images_fake.py) over HTTP.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from shared.errors import PayloadTooLarge, UpstreamUnavailable, ValidationFailed
from shared.storage import result_key
from shared.storage.cf_images import MAX_IMAGE_BYTES, CloudflareImagesStorage, image_id_for_key
from tests.fakes.cf_images_fake import CloudflareImagesFake
from tests.storage.conftest import png_file


@pytest.fixture
def provider(cf_images_fake: CloudflareImagesFake) -> CloudflareImagesStorage:
    return CloudflareImagesStorage(
        cf_images_fake.account_id, cf_images_fake.api_token, api_base=cf_images_fake.api_base
    )


def new_key() -> str:
    return result_key(uuid.uuid4().hex, 0, "image/png")


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("image/png", True),
        ("image/jpeg", True),
        ("image/gif", True),
        ("image/webp", True),
        ("image/svg+xml", True),
        ("IMAGE/PNG; charset=binary", True),
        ("video/mp4", False),
        ("image/tiff", False),
        ("application/octet-stream", False),
    ],
)
def test_accepts_only_still_image_types(
    provider: CloudflareImagesStorage, content_type: str, accepted: bool
) -> None:
    assert provider.accepts(content_type) is accepted


def test_video_is_refused_without_a_request(
    provider: CloudflareImagesStorage, cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    video = tmp_path / "result.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    requests_before = len(cf_images_fake.requests)

    with pytest.raises(ValidationFailed):
        provider.upload_file(video, result_key("t", 0, "video/mp4"), "video/mp4")

    assert len(cf_images_fake.requests) == requests_before


def test_file_over_10_mb_is_refused_before_upload(
    provider: CloudflareImagesStorage, cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    _, data = png_file(tmp_path, seed=10)
    big = tmp_path / "big.png"
    big.write_bytes(data + b"\x00" * (MAX_IMAGE_BYTES + 1 - len(data)))
    requests_before = len(cf_images_fake.requests)

    with pytest.raises(PayloadTooLarge) as caught:
        provider.upload_file(big, new_key(), "image/png")

    assert caught.value.details["limit"] == MAX_IMAGE_BYTES
    assert len(cf_images_fake.requests) == requests_before


def test_the_fake_itself_enforces_the_documented_limit_and_formats(
    cf_images_fake: CloudflareImagesFake,
) -> None:
    url = f"{cf_images_fake.api_base}/accounts/{cf_images_fake.account_id}/images/v1"
    headers = {"Authorization": f"Bearer {cf_images_fake.api_token}"}

    too_big = httpx.post(
        url, headers=headers, files={"file": ("a.png", b"\x89PNG\r\n\x1a\n" + b"0" * MAX_IMAGE_BYTES)}
    )
    not_an_image = httpx.post(url, headers=headers, files={"file": ("a.png", b"plain text")})

    assert too_big.status_code == 413
    assert too_big.json()["success"] is False
    assert not_an_image.status_code == 415
    assert not_an_image.json()["errors"][0]["code"] == 5415


def test_upload_uses_the_key_as_a_deterministic_custom_id(
    provider: CloudflareImagesStorage, cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    path, _ = png_file(tmp_path, seed=11)
    key = new_key()

    stored = provider.upload_file(path, key, "image/png")

    image_id = key.replace("/", "~")
    assert stored.extra["image_id"] == image_id
    assert image_id in cf_images_fake.images
    assert stored.url == cf_images_fake.variant_url(image_id, "public")


def test_retry_with_an_existing_id_deletes_and_uploads_again(
    provider: CloudflareImagesStorage, cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    first, _ = png_file(tmp_path, seed=12)
    second, second_data = png_file(tmp_path, seed=13)
    key = new_key()
    provider.upload_file(first, key, "image/png")

    stored = provider.upload_file(second, key, "image/png")

    image_id = image_id_for_key(key)
    assert stored.extra["replaced"] is True
    assert cf_images_fake.images[image_id].data == second_data
    assert ("DELETE", f"/client/v4/accounts/{cf_images_fake.account_id}/images/v1/{image_id}") in (
        cf_images_fake.requests
    )


def test_delivery_domain_gives_the_custom_domain_url(
    cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    provider = CloudflareImagesStorage(
        cf_images_fake.account_id,
        cf_images_fake.api_token,
        api_base=cf_images_fake.api_base,
        delivery_domain=cf_images_fake.base_url,
    )
    path, data = png_file(tmp_path, seed=14)
    key = new_key()

    stored = provider.upload_file(path, key, "image/png")

    delivery_path = f"{cf_images_fake.account_hash}/{image_id_for_key(key)}/public"
    assert stored.url == f"{cf_images_fake.base_url}/cdn-cgi/imagedelivery/{delivery_path}"
    assert httpx.get(stored.url).content == data


def test_bare_delivery_domain_defaults_to_https() -> None:
    provider = CloudflareImagesStorage("acct", "token", delivery_domain="img.example.com")

    url = provider._delivery_url(
        ["https://imagedelivery.net/HASH/results~t~000.png/public"], "results/t/000.png"
    )

    assert url == "https://img.example.com/cdn-cgi/imagedelivery/HASH/results~t~000.png/public"


def test_refusal_carries_the_upstream_status_and_body(
    cf_images_fake: CloudflareImagesFake, tmp_path: Path
) -> None:
    provider = CloudflareImagesStorage(
        cf_images_fake.account_id, "wrong-token", api_base=cf_images_fake.api_base
    )
    path, _ = png_file(tmp_path, seed=15)

    with pytest.raises(UpstreamUnavailable) as caught:
        provider.upload_file(path, new_key(), "image/png")

    error = caught.value
    assert error.details["status"] == 403
    assert "Authentication error" in error.details["body"]
    assert error.retryable is False  # a wrong token does not fix itself


def test_health_checks_the_token_without_uploading(cf_images_fake: CloudflareImagesFake) -> None:
    good = CloudflareImagesStorage(
        cf_images_fake.account_id, cf_images_fake.api_token, api_base=cf_images_fake.api_base
    )
    bad = CloudflareImagesStorage(cf_images_fake.account_id, "wrong-token", api_base=cf_images_fake.api_base)

    assert good.health()["status"] == "configured"
    assert bad.health()["status"] == "error"
    assert bad.health()["error"]["details"]["status"] == 403


@pytest.mark.parametrize("key", ["results/a~b/000.png", "results/" + "x" * 1100])
def test_keys_that_cannot_map_to_an_id_are_refused(key: str) -> None:
    with pytest.raises(ValidationFailed):
        image_id_for_key(key)
