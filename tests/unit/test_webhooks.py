"""Webhooks: Standard Webhooks signatures, retries with backoff, SSRF refusal, recorded outcome."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
from typing import Any

import pytest

from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, TaskStatus
from shared.webhooks import WebhookNotifier, sign, verify

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _loopback_only(ip: str, port: int) -> None:
    if not ip.startswith("127."):
        pytest.fail(f"tried to connect to {ip}")


@pytest.fixture
def store(tmp_path):
    return SQLiteTaskStore(tmp_path / "t.sqlite3")


def _finished_task(store, url: str) -> Task:
    task = Task(workflow="face_swap", environment="face_swap", webhook_url=url)
    store.create(task)
    return store.cancel(task.taskId)


def _notifier(store, tmp_path, **overrides) -> WebhookNotifier:
    settings = Settings(data_dir=tmp_path, webhook_secret=SECRET, fetch_allow_loopback=True, **overrides)
    fetcher = SafeFetcher(
        max_bytes=65536,
        timeout_s=5,
        max_image_pixels=10**6,
        allow_loopback=True,
        connection_guard=_loopback_only,
    )
    return WebhookNotifier(settings, store, fetcher)


def test_signature_round_trip_and_tamper_detection():
    body = b'{"a":1}'
    signature = sign(SECRET, "msg_1", 1_700_000_000, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000", "webhook-signature": signature}

    assert signature.startswith("v1,")
    assert verify(SECRET, headers, body, tolerance_s=10**10)
    assert not verify(SECRET, headers, b'{"a":2}', tolerance_s=10**10)


def test_delivery_retries_then_succeeds_signed_and_is_recorded(store, tmp_path):
    receiver = Receiver([503, 200])
    try:
        task = _finished_task(store, receiver.url)

        asyncio.run(_notifier(store, tmp_path).notify(task, base_delay_s=0.01))

        assert len(receiver.requests) == 2
        (first_headers, _), (headers, body) = receiver.requests
        assert first_headers["webhook-id"] == headers["webhook-id"] == f"{task.taskId}.cancelled"
        assert verify(SECRET, headers, body)
        event = json.loads(body)
        assert event["type"] == "task.cancelled" and event["data"]["taskId"] == task.taskId
        assert "owner" not in event["data"]["task"]
        recorded = store.get(task.taskId)
        assert recorded.webhook_delivery["status"] == "delivered"
        assert recorded.webhook_delivery["attempts"] == 2
        assert recorded.status == TaskStatus.CANCELLED
    finally:
        receiver.close()


def test_client_error_is_not_retried(store, tmp_path):
    receiver = Receiver([410])
    try:
        task = _finished_task(store, receiver.url)

        asyncio.run(_notifier(store, tmp_path).notify(task, base_delay_s=0.01))

        assert len(receiver.requests) == 1
        assert store.get(task.taskId).webhook_delivery["status"] == "rejected"
    finally:
        receiver.close()


def test_gives_up_after_max_attempts(store, tmp_path):
    receiver = Receiver([500] * 10)
    try:
        task = _finished_task(store, receiver.url)

        asyncio.run(_notifier(store, tmp_path).notify(task, max_attempts=3, base_delay_s=0.01))

        assert len(receiver.requests) == 3
        assert store.get(task.taskId).webhook_delivery == {
            **store.get(task.taskId).webhook_delivery,
            "status": "failed",
            "attempts": 3,
            "last_status_code": 500,
        }
    finally:
        receiver.close()


@pytest.mark.parametrize(
    "url", ["http://10.0.0.7/hook", "http://169.254.169.254/latest", "http://[::ffff:10.0.0.1]/"]
)
def test_private_receivers_are_refused_without_connecting(store, tmp_path, url):
    task = _finished_task(store, url)

    asyncio.run(_notifier(store, tmp_path).notify(task, base_delay_s=0.01))

    assert store.get(task.taskId).webhook_delivery["status"] == "refused"


def test_private_webhook_url_is_a_400_at_create(tmp_path, monkeypatch):
    from shared.auth import Principal
    from shared.dispatch import NoopDispatcher
    from shared.errors import ValidationFailed
    from shared.service import TaskService

    service = TaskService(
        Settings(data_dir=tmp_path), SQLiteTaskStore(tmp_path / "s.sqlite3"), NoopDispatcher()
    )
    body = {
        "workflow": "basic_generation",
        "webhook_url": "http://192.168.1.1/hook",
    }

    with pytest.raises(ValidationFailed) as refused:
        service.create_task(body, principal=Principal(owner="a", roles=frozenset({"client"})))

    assert refused.value.field == "webhook_url"
