"""The cloud path end to end on emulators, through real HTTP.

A face swap is created on the dev server (the three functions) with TASK_STORE=firestore
and DISPATCH_MODE=push: the task is written to the Firestore emulator and enqueued on
the Cloud Tasks emulator, which POSTs its id to the runner's push endpoint; the runner
claims it in Firestore, swaps, and uploads the result to fake-gcs-server, to moto's S3
server as R2, or to the Cloudflare Images fake. The task ends COMPLETED with a URL that
downloads the swapped image from that store.

Then a retryable failure in push mode: with the storage down, the runner records the
attempt, puts the task back to PENDING and answers 503; the Cloud Tasks emulator
delivers it again and, once the storage is up, the task completes on a later attempt.

The emulator sends no OIDC token, so the runner's push endpoint runs on API-key auth,
open here (no API_KEYS); OIDC is tested in tests/cloud/test_oidc.py. Every server is
started on 127.0.0.1 and stopped by its PID; a missing emulator skips with the reason.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from comfyswap.emulators import (
    CloudTasksEmulator,
    EmulatorProcess,
    FirestoreEmulator,
    create_gcs_bucket,
    create_s3_bucket,
    free_port,
    gcs_env,
    r2_env,
    start_cloud_tasks_emulator,
    start_fake_gcs_server,
    start_moto_server,
    task_path_env,
)
from tests.cloud_fixtures import firestore_emulator, started_or_skip
from tests.e2e.conftest import Stack, start_stack
from tests.fakes.cf_images_fake import CloudflareImagesFake
from tests.servers import MediaServer

__all__ = ["firestore_emulator"]

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

# Its own project in the session's Firestore emulator: other suites reset theirs.
PROJECT = "comfyswap-e2e-cloud"
S3_ACCESS_KEY = "test-access-key"
S3_SECRET_KEY = "test-secret-key"
# The emulator re-delivers a failed push every 0.1 s, at most this many times: enough for
# MAX_ATTEMPTS deliveries of the retry test, never forever.
CLOUD_TASKS_RETRIES = 10


@dataclasses.dataclass
class CloudEmulators:
    firestore: FirestoreEmulator
    cloud_tasks: CloudTasksEmulator
    fake_gcs: EmulatorProcess
    moto_s3: EmulatorProcess
    cf_images: CloudflareImagesFake
    log_dir: Path


@pytest.fixture(scope="module")
def emulators(
    firestore_emulator: FirestoreEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CloudEmulators]:
    log_dir = tmp_path_factory.mktemp("cloud-path-emulators")
    with (
        started_or_skip(
            lambda: start_cloud_tasks_emulator(log_dir, max_retries=CLOUD_TASKS_RETRIES),
            lambda: start_fake_gcs_server(log_dir),
            lambda: start_moto_server(log_dir),
        ) as (cloud_tasks, fake_gcs, moto_s3),
        CloudflareImagesFake() as cf_images,
    ):
        yield CloudEmulators(firestore_emulator, cloud_tasks, fake_gcs, moto_s3, cf_images, log_dir)


def start_cloud_stack(tmp_path: Path, emulators: CloudEmulators, storage_env: dict[str, str]) -> Stack:
    """The dev server and the runner on the emulators, with a queue of their own."""
    queue = f"runner-{uuid.uuid4().hex[:8]}"
    emulators.cloud_tasks.create_queue(queue, project=PROJECT)
    return start_stack(
        tmp_path,
        {
            **task_path_env(emulators.firestore, emulators.cloud_tasks, queue=queue, project=PROJECT),
            **storage_env,
            "LOG_LEVEL": "INFO",
        },
    )


def stop_stack(stack: Stack) -> None:
    stack.client.close()
    stack.runner.stop(timeout_s=30)
    stack.api.stop()


def data_url(content: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(content).decode()}"


def face_swap_body(grace_hopper_path: Path, astronaut_png: Path) -> dict[str, Any]:
    return {
        "workflow": "face_swap",
        "environment": "face_swap",
        "task_data": {
            "source_url": data_url(grace_hopper_path.read_bytes(), "image/jpeg"),
            "target_url": data_url(astronaut_png.read_bytes(), "image/png"),
        },
    }


def stored_document(
    emulators: CloudEmulators, task_id: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """The task's document as the Firestore emulator holds it (not as the API shows it)."""
    from google.cloud import firestore

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", emulators.firestore.host)
    client = firestore.Client(project=PROJECT)
    try:
        snapshot = client.collection("tasks").document(task_id).get()
        assert snapshot.exists, f"{task_id} is not in the Firestore emulator"
        document: dict[str, Any] = snapshot.to_dict() or {}
        return document
    finally:
        client.close()


def push_deliveries(emulators: CloudEmulators, stack: Stack, task_id: str) -> int:
    """How many times the Cloud Tasks emulator POSTed this task to the runner (its log)."""
    log = emulators.cloud_tasks.server.log()
    submitted = [line for line in log.splitlines() if "Submitting task" in line and task_id in line]
    assert f"Requesting POST {stack.runner.url}/internal/tasks/run" in log
    return len(submitted)


def assert_face_swapped(image_bytes: bytes, astronaut_png: Path) -> None:
    output = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB")).astype(int)
    target = np.asarray(Image.open(astronaut_png).convert("RGB")).astype(int)
    assert output.shape == target.shape
    changed = np.abs(output - target).sum(axis=2) > 30
    # The astronaut's face is around (x 170-290, y 60-200) in the 512x512 photo.
    assert changed[60:200, 170:290].mean() > 0.2
    assert not changed[300:, :].any()


def wait_for(stack: Stack, task_id: str, predicate: Any, *, timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = stack.client.get(f"/api/tasks/{task_id}").json()
        if predicate(view):
            return view
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not after {timeout_s}s: {view}\n{stack.runner.log()[-3000:]}")


# --- one face swap per result store -------------------------------------------------------
def storage_settings(emulators: CloudEmulators, provider: str) -> tuple[dict[str, str], str]:
    """STORAGE_* settings for ``provider`` on its emulator, and where its URLs point."""
    bucket = f"results-{uuid.uuid4().hex[:12]}"
    if provider == "gcs":
        create_gcs_bucket(emulators.fake_gcs.url, bucket, project=PROJECT)
        return {"STORAGE_PROVIDER": "gcs", **gcs_env(emulators.fake_gcs.url, bucket)}, emulators.fake_gcs.url
    if provider == "r2":
        create_s3_bucket(emulators.moto_s3.url, bucket, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
        settings = r2_env(emulators.moto_s3.url, bucket, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
        return {"STORAGE_PROVIDER": "r2", **settings}, emulators.moto_s3.url
    fake = emulators.cf_images
    return {
        "STORAGE_PROVIDER": "cf_images",
        "CF_IMAGES_ACCOUNT_ID": fake.account_id,
        "CF_IMAGES_API_TOKEN": fake.api_token,
        "CF_IMAGES_API_BASE": fake.api_base,
    }, fake.base_url


@pytest.mark.parametrize("provider", ["gcs", "r2", "cf_images"])
def test_a_face_swap_is_pushed_by_cloud_tasks_claimed_in_firestore_and_stored(
    emulators: CloudEmulators,
    provider: str,
    tmp_path: Path,
    grace_hopper_path: Path,
    astronaut_png: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage_env, store_url = storage_settings(emulators, provider)
    stack = start_cloud_stack(tmp_path, emulators, storage_env)
    try:
        created = stack.create(face_swap_body(grace_hopper_path, astronaut_png))
        assert created.status_code == 200, created.text
        task_id = created.json()["taskId"]

        view = stack.wait(task_id, timeout_s=90)

        assert view["status"] == "COMPLETED", view
        result = view["result"]
        assert result["provider"] == provider
        assert result["url"].startswith(store_url + "/")
        assert view["task"]["attempts"] == 1
        document = stored_document(emulators, task_id, monkeypatch)
        assert document["status"] == "COMPLETED"
        assert document["output_data"]["url"] == result["url"]
        assert not (stack.data_dir / "tasks.sqlite3").exists()
        assert push_deliveries(emulators, stack, task_id) == 1
        download = httpx.get(result["url"], timeout=30)
        assert download.status_code == 200
        assert download.headers["content-type"].startswith("image/")
        assert_face_swapped(download.content, astronaut_png)
    finally:
        stop_stack(stack)


# --- a retryable failure in push mode ---------------------------------------------------
def test_with_storage_down_the_push_is_retried_and_completes_once_storage_is_back(
    emulators: CloudEmulators,
    tmp_path: Path,
    grace_hopper_path: Path,
    astronaut_png: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gcs_port = free_port()  # nothing listens here until the test starts fake-gcs-server on it
    gcs_url = f"http://127.0.0.1:{gcs_port}"
    bucket = f"results-{uuid.uuid4().hex[:12]}"
    stack = start_cloud_stack(
        tmp_path,
        emulators,
        {
            "STORAGE_PROVIDER": "gcs",
            **gcs_env(gcs_url, bucket),
            "STORAGE_RETRY_DEADLINE_S": "1",
            "MAX_ATTEMPTS": str(CLOUD_TASKS_RETRIES - 2),
        },
    )
    late_gcs: EmulatorProcess | None = None
    media = MediaServer()
    media.add("/source.jpg", "image/jpeg", grace_hopper_path.read_bytes())
    media.add("/target.png", "image/png", astronaut_png.read_bytes())
    try:
        # Inputs by URL: a data: input would wait in the (down) bucket, and creating the
        # task would be refused with a retryable 503 instead.
        with media.running():
            body = {
                "workflow": "face_swap",
                "environment": "face_swap",
                "task_data": {
                    "source_url": media.url + "/source.jpg",
                    "target_url": media.url + "/target.png",
                },
            }
            created = stack.create(body)
            assert created.status_code == 200, created.text
            task_id = created.json()["taskId"]
            failed_once = wait_for(
                stack,
                task_id,
                lambda view: len(view["task"]["attempt_history"]) >= 1,
                timeout_s=90,
                what="a first attempt that failed on the storage",
            )
            assert failed_once["task"]["attempt_history"][0]["code"] == "storage_unavailable"

            late_gcs = start_fake_gcs_server(emulators.log_dir / f"gcs-{gcs_port}", port=gcs_port)
            create_gcs_bucket(gcs_url, bucket, project=PROJECT)
            view = stack.wait(task_id, timeout_s=120)

            assert view["status"] == "COMPLETED", view
            attempts = view["task"]["attempts"]
            assert attempts >= 2
            assert len(view["task"]["attempt_history"]) == attempts - 1
            assert push_deliveries(emulators, stack, task_id) == attempts
            assert stored_document(emulators, task_id, monkeypatch)["status"] == "COMPLETED"
            download = httpx.get(view["result"]["url"], timeout=30)
            assert download.status_code == 200
            assert_face_swapped(download.content, astronaut_png)
    finally:
        stop_stack(stack)
        if late_gcs is not None:
            late_gcs.stop()


# --- inputs of any size (issue 19 #1) -----------------------------------------------------
def gcs_keys(emulators: CloudEmulators, bucket: str, prefix: str) -> list[str]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.storage import Client as StorageClient

    client = StorageClient(
        project=PROJECT,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]  # untyped in google-auth
        client_options={"api_endpoint": emulators.fake_gcs.url},
    )
    try:
        return [blob.name for blob in client.list_blobs(bucket, prefix=prefix)]
    finally:
        client.close()


def test_a_5_mb_photo_as_a_data_input_completes_on_firestore_and_leaves_no_copy(
    emulators: CloudEmulators, tmp_path: Path, astronaut_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finding: over ~786 KB raw, a data: input answered 500 (Firestore's 1 MiB
    document limit). Now the photo waits in the bucket under inputs/<task_id>/ and the
    document holds its reference (digest and size) only, until the task ends."""
    from tests.large_photo import data_url as large_data_url
    from tests.large_photo import five_mb_photo_jpeg

    photo = five_mb_photo_jpeg()
    storage_env, _ = storage_settings(emulators, "gcs")
    bucket = storage_env["GCS_BUCKET_NAME"]
    stack = start_cloud_stack(tmp_path, emulators, storage_env)
    try:
        created = stack.create(
            {
                "workflow": "face_swap",
                "environment": "face_swap",
                "task_data": {
                    "source_url": large_data_url(photo, "image/jpeg"),
                    "target_url": data_url(astronaut_png.read_bytes(), "image/png"),
                },
            }
        )
        assert created.status_code == 200, created.text
        task_id = created.json()["taskId"]
        view = stack.wait(task_id, timeout_s=180)

        assert view["status"] == "COMPLETED", view
        document = stored_document(emulators, task_id, monkeypatch)
        source = document["params"]["input_data"]["source_url"]
        assert source.startswith(f"input:{task_id}/source_url;sha256=") and source.endswith(
            f";size={len(photo)}"
        )
        assert "base64" not in str(document)
        assert len(stack.client.get(f"/api/tasks/{task_id}").content) < 100_000
        deadline = time.monotonic() + 30
        while gcs_keys(emulators, bucket, f"inputs/{task_id}/") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gcs_keys(emulators, bucket, f"inputs/{task_id}/") == []
        assert gcs_keys(emulators, bucket, f"results/{task_id}/") != []
    finally:
        stop_stack(stack)
