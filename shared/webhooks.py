"""Completion webhooks: signed the Standard Webhooks way, retried, SSRF-safe.

A task created with ``webhook_url`` gets one POST when it ends (COMPLETED, FAILED or
CANCELLED). Headers follow https://www.standardwebhooks.com: ``webhook-id`` (stable per
task and event, so a receiver can de-duplicate retries), ``webhook-timestamp`` (unix
seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``
keyed by WEBHOOK_SECRET (``whsec_<base64>``). The receiving URL is checked like any
input URL (no private addresses, pinned DNS, no redirects).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

from shared.errors import ComfySwapError, JobFailed, UnsafeInput
from shared.logs import get_logger, log_event, log_failure
from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.store.base import TaskStore
from shared.tasks import Task, utcnow, without_input_media

__all__ = ["WebhookNotifier", "sign", "verify"]

logger = get_logger(__name__)


def _secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<signature>`` for the Standard Webhooks ``webhook-signature`` header."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, *, tolerance_s: int = 300) -> bool:
    """What a receiver does (and what the tests do): check the signature and its age."""
    lowered = {key.lower(): value for key, value in headers.items()}
    timestamp = int(lowered["webhook-timestamp"])
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, lowered["webhook-id"], timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in lowered["webhook-signature"].split())


def event_body(task: Task) -> dict[str, Any]:
    document = without_input_media(task.to_document())
    for private in ("request_fingerprint", "webhook_delivery", "owner", "idempotency_key"):
        document.pop(private, None)
    return {
        "type": f"task.{task.status.value.lower()}",
        "timestamp": utcnow().isoformat(),
        "data": {"taskId": task.taskId, "status": task.status.value, "task": document},
    }


class WebhookNotifier:
    def __init__(self, settings: Settings, store: TaskStore, fetcher: SafeFetcher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.fetcher = fetcher or SafeFetcher(
            max_bytes=65536,
            timeout_s=10.0,
            max_image_pixels=settings.max_image_pixels,
            allow_loopback=settings.fetch_allow_loopback,
        )

    async def notify(self, task: Task, *, max_attempts: int | None = None, base_delay_s: float = 1.0) -> None:
        """Deliver the task's terminal event; record the outcome on the task. Never raises."""
        if not task.webhook_url or not task.is_terminal:
            return
        attempts_allowed = max_attempts or self.settings.webhook_max_attempts
        message_id = f"{task.taskId}.{task.status.value.lower()}"
        body = json.dumps(event_body(task), separators=(",", ":")).encode()
        last_status: int | None = None
        outcome = "failed"
        attempt = 0
        for attempt in range(1, attempts_allowed + 1):  # the count is recorded below
            timestamp = int(time.time())
            headers = {"webhook-id": message_id, "webhook-timestamp": str(timestamp)}
            if self.settings.webhook_secret:
                headers["webhook-signature"] = sign(self.settings.webhook_secret, message_id, timestamp, body)
            try:
                last_status, _ = await self.fetcher.post_json(
                    task.webhook_url, body, headers=headers, field="webhook_url"
                )
            except (UnsafeInput, JobFailed) as exc:
                log_failure(logger, "webhook_refused", exc, task_id=task.taskId)
                outcome = "refused"
                break
            except ComfySwapError as exc:
                log_event(
                    logger, "webhook_attempt_failed", task_id=task.taskId, attempt=attempt, error=exc.message
                )
            else:
                if 200 <= last_status < 300:
                    outcome = "delivered"
                    break
                if 400 <= last_status < 500 and last_status not in (408, 425, 429):
                    outcome = "rejected"
                    break
            if attempt < attempts_allowed:
                await asyncio.sleep(base_delay_s * 2 ** (attempt - 1))
        record = {
            "status": outcome,
            "attempts": attempt,
            "last_status_code": last_status,
            "at": utcnow().isoformat(),
        }
        log_event(
            logger, "webhook_" + outcome, task_id=task.taskId, attempts=attempt, status_code=last_status
        )

        def mutate(current: Task) -> Task:
            updated = current.model_copy(deep=True)
            updated.webhook_delivery = record
            return updated

        try:
            await asyncio.to_thread(self.store.update, task.taskId, mutate)
        except ComfySwapError as exc:
            log_event(
                logger, "webhook_record_failed", task_id=task.taskId, error=exc.message, level=logging.WARNING
            )
