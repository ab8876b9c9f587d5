"""Issue 13, finding 3: one tenant cannot stall the API for the others.

A hundred long polls from one tenant hold at most MAX_WAITS_PER_TENANT of the dev
server's threads (the rest are refused at once), so an anonymous health check and another
tenant's status keep answering; a cancel whose webhook never answers returns at once and
the webhook still goes out, after the answer.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.auth import hash_api_key
from tests.faults.stack import FaultStack
from tests.servers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEYS = {"alice": "csk_alice_long_polls", "bob": "csk_bob_long_polls"}
WAITS_PER_TENANT = 4
COMFY_TASK = {"workflow": "basic_generation", "task_data": {"prompt": "waiting"}}


def as_(who: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[who]}


@pytest.fixture
def stack(make_stack) -> FaultStack:
    # No runner: the tasks stay PENDING, so every long poll runs its whole course.
    api_keys = ",".join(f"{hash_api_key(key)}:{who}:client" for who, key in KEYS.items())
    stack: FaultStack = make_stack(
        {"API_KEYS": api_keys, "MAX_WAITS_PER_TENANT": str(WAITS_PER_TENANT), "RATE_LIMIT_BURST": "1000"},
        runner=False,
    )
    return stack


def timed_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.get(url, headers=headers, timeout=60)
    return response.status_code, time.monotonic() - started


def test_a_hundred_long_polls_of_one_tenant_leave_health_and_other_tenants_fast(stack):
    task_id = stack.create(COMFY_TASK, headers=as_("alice"))
    answers: list[tuple[int, float]] = []
    lock = threading.Lock()

    def long_poll() -> None:
        result = timed_get(f"{stack.api.url}/api/tasks/{task_id}?wait=25", as_("alice"))
        with lock:
            answers.append(result)

    polls = [threading.Thread(target=long_poll, daemon=True) for _ in range(100)]
    for poll in polls:
        poll.start()
    wait_until(lambda: len(answers) >= 100 - WAITS_PER_TENANT, timeout_s=30, what="the refused polls")

    health = [timed_get(stack.api.url + "/api/health") for _ in range(3)]
    status = [timed_get(stack.api.url + "/api/status", as_("bob")) for _ in range(3)]
    bobs_task = stack.create(COMFY_TASK, headers=as_("bob"))
    bobs_poll = timed_get(f"{stack.api.url}/api/tasks/{bobs_task}?wait=0.5", as_("bob"))

    stack.client.post(f"/api/tasks/{task_id}/cancel", headers=as_("alice"))  # ends the held polls
    for poll in polls:
        poll.join(timeout=30)
    assert all(code == 200 for code, _ in health + status), (health, status)
    assert max(seconds for _, seconds in health + status) < 1.0, (health, status)
    assert bobs_poll[0] == 200
    refused = [seconds for code, seconds in answers if code == 429]
    held = [seconds for code, seconds in answers if code == 200]
    assert len(refused) == 100 - WAITS_PER_TENANT and len(held) == WAITS_PER_TENANT, answers
    assert max(refused) < 10.0  # refused at once, not after holding a thread


class _SilentReceiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that takes the request and never answers (until the test ends)."""

    received: list[str] = []
    release = threading.Event()

    def do_POST(self) -> None:
        self.received.append(self.path)
        self.release.wait(60)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def silent_receiver() -> Iterator[tuple[str, type[_SilentReceiver]]]:
    handler = type("Receiver", (_SilentReceiver,), {"received": [], "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    handler.release.set()
    server.shutdown()
    server.server_close()


def test_a_cancel_returns_at_once_when_its_webhook_never_answers(stack, silent_receiver):
    hook_url, receiver = silent_receiver
    task_id = stack.create({**COMFY_TASK, "webhook_url": hook_url}, headers=as_("alice"))

    started = time.monotonic()
    response = stack.client.post(f"/api/tasks/{task_id}/cancel", headers=as_("alice"))
    elapsed = time.monotonic() - started

    assert response.status_code == 200 and response.json()["status"] == "CANCELLED"
    assert elapsed < 5.0, f"the cancel took {elapsed:.1f}s"
    wait_until(lambda: receiver.received == ["/hook"], timeout_s=30, what="the webhook delivery")
