"""The runner's push endpoint accepts only Cloud Tasks OIDC tokens for its invoker
account: tokens signed by a locally generated key, certificates served on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.cloud.test_oidc import AUDIENCE, INVOKER, KEY_ID, _key_and_certificate, sign


@pytest.fixture(scope="module")
def google_key():
    return _key_and_certificate("google-test-endpoint")


@pytest.fixture(scope="module")
def certs_url(google_key):
    body = json.dumps({KEY_ID: google_key[1]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=3600")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
    server.shutdown()
    server.server_close()


@pytest.fixture
def runner(tmp_path, certs_url):
    from gpu_runner.app import RunnerState, create_app
    from shared.settings import Settings
    from shared.store.sqlite import SQLiteTaskStore
    from shared.tasks import Task

    settings = Settings(
        data_dir=tmp_path,
        dispatch_mode="push",
        cloud_tasks_invoker_email=INVOKER,
        runner_oidc_audience=AUDIENCE,
        google_oidc_certs_url=certs_url,
    )
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    finished = Task(workflow="face_swap", environment="face_swap")
    store.create(finished)
    store.cancel(finished.taskId)
    state = RunnerState(settings, store=store, engines={})
    # The push route needs no started worker, so the app is driven over ASGI directly.
    return create_app(settings, state=state), finished.taskId


def _push(app, task_id, token):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://runner"
        ) as client:
            return await client.post("/internal/tasks/run", json={"task_id": task_id}, headers=headers)

    return asyncio.run(call())


def test_a_valid_token_is_accepted(runner, google_key):
    client, task_id = runner

    response = _push(client, task_id, sign(google_key[0]))

    assert response.status_code == 200
    assert response.json()["status"] == "not_claimable"


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"aud": "https://somewhere-else.example"}, 401),
        ({"iss": "https://evil.example"}, 401),
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, 401),
        ({"email": "other@project.iam.gserviceaccount.com"}, 403),
        ({"email_verified": False}, 403),
    ],
    ids=["wrong-audience", "wrong-issuer", "expired", "other-service-account", "unverified-email"],
)
def test_tokens_that_fail_a_check_are_refused(runner, google_key, claims, status):
    client, task_id = runner

    response = _push(client, task_id, sign(google_key[0], **claims))

    assert response.status_code == status, response.text


def test_no_token_or_a_forged_one_is_401(runner):
    client, task_id = runner
    forger, _ = _key_and_certificate("forger")

    assert _push(client, task_id, None).status_code == 401
    assert _push(client, task_id, sign(forger)).status_code == 401
