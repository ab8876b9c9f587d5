"""GCS_BUCKET_REGION is read: the GCS health check compares it with the bucket's location
(fake-gcs-server, which reports a bucket's location as GCS does)."""

from __future__ import annotations

from typing import Any

from shared.storage import make_provider
from tests.storage.conftest import new_gcs_bucket, storage_settings


def _health(fake_gcs, region: str) -> dict[str, Any]:
    bucket = new_gcs_bucket(fake_gcs)
    settings = storage_settings(
        storage_provider="gcs",
        gcs_bucket_name=bucket,
        gcs_bucket_region=region,
        storage_emulator_host=fake_gcs.url,
    )
    return make_provider("gcs", settings).health()


def test_a_bucket_in_the_configured_region_is_healthy_without_warning(fake_gcs):
    location = _health(fake_gcs, "")["location"]

    health = _health(fake_gcs, location.lower())

    assert health["status"] == "configured" and "warning" not in health, health


def test_a_bucket_in_another_region_is_reported(fake_gcs):
    health = _health(fake_gcs, "asia-northeast1")

    assert health["status"] == "configured"
    assert "GCS_BUCKET_REGION=asia-northeast1" in health["warning"]
    assert health["location"] in health["warning"]
