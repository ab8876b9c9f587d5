"""Inputs sent as ``data:`` stay out of a public results bucket (INPUTS_BUCKET).

The finding: the input store kept people's photos under ``inputs/`` in the results
bucket. A deployment with public results (Terraform ``public_results``) makes that bucket
readable, and a public Cloud Storage bucket also *lists* its objects, so anyone could
find and fetch every photo in flight. With INPUTS_BUCKET the inputs go to a private
bucket of their own, on fake-gcs-server and on moto's S3 (R2's protocol) alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from comfyswap.emulators import EmulatorProcess
from shared.inputs import make_input_store
from shared.settings import Settings
from tests.storage.conftest import (
    GCS_PROJECT,
    R2_ACCESS_KEY,
    R2_SECRET_KEY,
    new_gcs_bucket,
    new_r2_bucket,
    s3_admin_client,
    storage_settings,
)

TASK_ID = "task_" + "ab" * 16
PHOTO = b"\xff\xd8\xff\xe0 a face photo"

Keys = Callable[[str], list[str]]  # bucket -> the keys in it


def _gcs(fake_gcs: EmulatorProcess, key_file: Path, results: str, inputs: str) -> tuple[Settings, Keys]:
    settings = storage_settings(
        storage_provider="gcs",
        gcs_bucket_name=results,
        inputs_bucket=inputs,
        storage_emulator_host=fake_gcs.url,
        google_cloud_project=GCS_PROJECT,
        google_application_credentials=str(key_file),
    )

    def keys(bucket: str) -> list[str]:
        provider = make_input_store(settings).provider
        return [blob.name for blob in provider.client.list_blobs(bucket)]  # type: ignore[attr-defined]

    return settings, keys


def _r2(moto_s3: EmulatorProcess, results: str, inputs: str) -> tuple[Settings, Keys]:
    settings = storage_settings(
        storage_provider="r2",
        r2_bucket_name=results,
        inputs_bucket=inputs,
        r2_endpoint_url=moto_s3.url,
        r2_access_key=R2_ACCESS_KEY,
        r2_secret_key=R2_SECRET_KEY,
    )
    admin = s3_admin_client(moto_s3)

    def keys(bucket: str) -> list[str]:
        return [item["Key"] for item in admin.list_objects_v2(Bucket=bucket).get("Contents", [])]

    return settings, keys


@pytest.mark.parametrize("provider", ["gcs", "r2"])
def test_stored_inputs_go_to_the_inputs_bucket_and_never_to_the_results_bucket(
    provider: str, request: pytest.FixtureRequest
) -> None:
    if provider == "gcs":
        fake_gcs = request.getfixturevalue("fake_gcs")
        results, inputs = new_gcs_bucket(fake_gcs), new_gcs_bucket(fake_gcs)
        key_file = request.getfixturevalue("service_account_key_file")
        settings, keys = _gcs(fake_gcs, key_file, results, inputs)
    else:
        moto_s3 = request.getfixturevalue("moto_s3")
        results, inputs = new_r2_bucket(moto_s3), new_r2_bucket(moto_s3)
        settings, keys = _r2(moto_s3, results, inputs)
    store = make_input_store(settings)
    ref = store.put(TASK_ID, "source_url", PHOTO, "image/jpeg")

    assert keys(inputs) == [f"inputs/{TASK_ID}/source_url"]
    assert keys(results) == [], "a photo in the results bucket is readable wherever results are"
    # The runner (another process, the same settings) reads it back and the task's end removes it.
    assert make_input_store(settings).read(ref) == PHOTO
    assert set(make_input_store(settings).stored_task_ids()) == {TASK_ID}
    assert make_input_store(settings).delete([ref]) == 1
    assert keys(inputs) == []


def test_without_an_inputs_bucket_inputs_stay_under_inputs_in_the_results_bucket(
    fake_gcs: EmulatorProcess, service_account_key_file: Path
) -> None:
    """The default (private results): nothing moves for deployments that set nothing."""
    results = new_gcs_bucket(fake_gcs)
    settings, keys = _gcs(fake_gcs, service_account_key_file, results, "")
    make_input_store(settings).put(TASK_ID, "target_url", PHOTO, "image/jpeg")
    assert keys(results) == [f"inputs/{TASK_ID}/target_url"]
