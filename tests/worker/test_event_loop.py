"""Nothing the runner's routes do may stall its event loop: a task's lease heartbeats run
on the same loop, so one slow dependency answering a route would let every lease lapse.

Each test holds a task in the engine, calls a route whose work waits 5 s on a slow
dependency (a real loopback server that answers after 5 s), and reads the lease from
the store meanwhile: renewals must keep coming at the heartbeat pace (every lease/3),
never leave a gap near the lease length.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from gpu_runner.app import RunnerState, create_app
from shared.auth import hash_api_key
from shared.settings import Settings
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import TaskStatus
from tests.servers import MediaServer

from .conftest import LEASE_SECONDS, SteeredEngine, face_swap_task, watching_lease

pytestmark = pytest.mark.timeout(90)

SLOW_S = 5.0
# A blocked loop leaves a gap of SLOW_S plus a heartbeat interval (about 6.7 s); an
# unblocked one renews every LEASE_SECONDS / 3 (about 1.7 s), slower only on a busy machine.
LARGEST_HEALTHY_GAP_S = 0.8 * LEASE_SECONDS


def assert_heartbeats_kept_pace(
    started: float, ended: float, renewals: list[float], gap: float, *, slow_part: str
) -> None:
    assert ended - started >= SLOW_S * 0.9, slow_part
    assert len(renewals) >= 2, f"{len(renewals)} renewals in {ended - started:.1f}s"
    assert gap < LARGEST_HEALTHY_GAP_S, f"no heartbeat for {gap:.1f}s of a {ended - started:.1f}s request"


async def _hold_a_task_while(
    state: RunnerState, store: SQLiteTaskStore, engine: SteeredEngine, request: httpx.Request
) -> tuple[httpx.Response, float, float, list[float], float]:
    """Run one task into the engine, send ``request`` to the app, then let the task finish.
    Returns (response, request start, request end, renewal times, largest gap)."""
    task = store.create(face_swap_task())
    app = create_app(state.settings, state=state)
    with watching_lease(store, task.taskId) as renewals:
        running = asyncio.ensure_future(state.worker.run_pushed(task.taskId))
        await asyncio.wait_for(engine.engine_started.wait(), timeout=20)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://runner"
        ) as client:
            started = time.monotonic()
            response = await client.send(request)
            ended = time.monotonic()
        engine.engine_done.set()
        code, body = await asyncio.wait_for(running, timeout=20)
    assert (code, body["status"]) == (200, "COMPLETED"), body
    assert store.get_or_raise(task.taskId).status == TaskStatus.COMPLETED
    return response, started, ended, renewals.between(started, ended), renewals.largest_gap(started, ended)


def test_a_storage_health_check_of_5_s_leaves_heartbeats_on_time(
    tmp_path: Path, store: SQLiteTaskStore
) -> None:
    """/api/status asks every storage provider; here Cloudflare Images answers after 5 s."""
    stats = json.dumps({"success": True, "errors": [], "result": {"count": {"current": 1}}}).encode()
    with MediaServer().running() as cloudflare:
        cloudflare.add("/accounts/account/images/v1/stats", "application/json", stats, delay_s=SLOW_S)
        settings = Settings(
            data_dir=tmp_path / "data",
            lease_seconds=LEASE_SECONDS,
            storage_provider="local",
            storage_fallback="cf_images",
            cf_images_account_id="account",
            cf_images_api_token="token",
            cf_images_api_base=cloudflare.url,
        )
        engine = SteeredEngine()
        state = RunnerState(settings, store=store, engines={"face_swap": engine}, pull=False)

        response, started, ended, renewals, gap = asyncio.run(
            _hold_a_task_while(state, store, engine, httpx.Request("GET", "http://runner/api/status"))
        )

    providers = {report["provider"]: report for report in response.json()["storage"]["providers"]}
    assert response.status_code == 200 and "cf_images" in providers
    assert_heartbeats_kept_pace(started, ended, renewals, gap, slow_part="the slow provider was not asked")


def test_fetching_googles_certificates_for_5_s_leaves_heartbeats_on_time(
    tmp_path: Path, store: SQLiteTaskStore
) -> None:
    """A push is verified against Google's OIDC certificates; here they take 5 s to come."""
    from tests.cloud.test_oidc import AUDIENCE, INVOKER, KEY_ID, _key_and_certificate, sign

    private_key, certificate = _key_and_certificate("slow-certs")
    certs = json.dumps({KEY_ID: certificate}).encode()
    with MediaServer().running() as google:
        certs_url = google.add(
            "/oauth2/v1/certs",
            "application/json",
            certs,
            delay_s=SLOW_S,
            headers={"Cache-Control": "public, max-age=3600"},
        )
        settings = Settings(
            data_dir=tmp_path / "data",
            lease_seconds=LEASE_SECONDS,
            dispatch_mode="push",
            cloud_tasks_invoker_email=INVOKER,
            runner_oidc_audience=AUDIENCE,
            google_oidc_certs_url=certs_url,
        )
        engine = SteeredEngine()
        state = RunnerState(settings, store=store, engines={"face_swap": engine}, pull=False)
        push = httpx.Request(
            "POST",
            "http://runner/internal/tasks/run",
            json={"task_id": "task_unknown"},
            headers={"Authorization": f"Bearer {sign(private_key)}"},
        )

        response, started, ended, renewals, gap = asyncio.run(_hold_a_task_while(state, store, engine, push))

    assert response.status_code == 200 and response.json()["status"] == "unknown_task", response.text
    assert_heartbeats_kept_pace(started, ended, renewals, gap, slow_part="the certificates were not fetched")


def test_an_api_keys_file_slow_to_read_leaves_heartbeats_on_time(
    tmp_path: Path, store: SQLiteTaskStore
) -> None:
    """API_KEYS_FILE on a slow disk: a FIFO whose content comes 5 s after it is opened."""
    key = "csk_slow-disk-key"
    keys_file = tmp_path / "api-keys"
    os.mkfifo(keys_file)

    def write_keys_late() -> None:
        with keys_file.open("w") as fifo:  # blocks until the runner opens it to read
            time.sleep(SLOW_S)
            fifo.write(f"{hash_api_key(key)}:alice:client\n")

    writer = threading.Thread(target=write_keys_late, daemon=True)
    writer.start()
    settings = Settings(data_dir=tmp_path / "data", lease_seconds=LEASE_SECONDS, api_keys_file=keys_file)
    engine = SteeredEngine()
    state = RunnerState(settings, store=store, engines={"face_swap": engine}, pull=False)
    status = httpx.Request("GET", "http://runner/api/runner/status", headers={"X-API-Key": key})

    response, started, ended, renewals, gap = asyncio.run(_hold_a_task_while(state, store, engine, status))
    writer.join(timeout=10)

    assert response.status_code == 200, response.text
    assert_heartbeats_kept_pace(started, ended, renewals, gap, slow_part="the keys file was not read")
