"""Per-key rate limits: a token bucket per API key owner, 429 with Retry-After, runners and
public routes exempt. The bucket arithmetic is tested on a fake clock; the HTTP answer
through functions-framework, as the cloud serves the functions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from shared.auth import Principal
from shared.errors import RateLimited
from shared.ratelimit import RateLimiter
from tests.faults.keys import api_keys_setting, tenant_keys

REPO_ROOT = Path(__file__).resolve().parents[2]
KEYS = tenant_keys("rate")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client(owner: str) -> Principal:
    return Principal(owner=owner, roles=frozenset({"client"}))


def test_burst_then_refusal_with_the_wait_until_the_next_token():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)

    for _ in range(3):
        limiter.check(client("alice"))
    with pytest.raises(RateLimited) as refused:
        limiter.check(client("alice"))

    assert refused.value.http_status == 429
    assert refused.value.retry_after_s == 1
    assert refused.value.details["retry_after_s"] == 1


def test_tokens_come_back_at_the_configured_rate_up_to_the_burst():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=30, burst=2, clock=clock)  # one token every 2 s
    limiter.check(client("alice"))
    limiter.check(client("alice"))

    clock.now += 1.0
    with pytest.raises(RateLimited) as refused:
        limiter.check(client("alice"))
    assert refused.value.retry_after_s == 1
    clock.now += 1.0
    limiter.check(client("alice"))
    clock.now += 3600.0  # a long pause refills only up to the burst
    limiter.check(client("alice"))
    limiter.check(client("alice"))
    with pytest.raises(RateLimited):
        limiter.check(client("alice"))


def test_each_owner_has_its_own_bucket_and_runners_are_not_limited():
    limiter = RateLimiter(per_minute=1, burst=1, clock=FakeClock())
    limiter.check(client("alice"))
    with pytest.raises(RateLimited) as refused:
        limiter.check(client("alice"))

    limiter.check(client("bob"))
    runner = Principal(owner="runner", roles=frozenset({"runner"}))
    for _ in range(100):
        limiter.check(runner)
    assert refused.value.retry_after_s == 60


def test_buckets_that_refilled_are_forgotten():
    clock = FakeClock()
    limiter = RateLimiter(per_minute=60, burst=2, clock=clock)
    for owner in ("a", "b", "c"):
        limiter.check(client(owner))

    clock.now += 120.0
    limiter.check(client("d"))

    assert set(limiter._buckets) == {"d"}


# --- through the functions ---------------------------------------------------------------


@pytest.fixture
def functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, FlaskClient]]:
    entries = api_keys_setting(KEYS)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("API_KEYS", entries)
    monkeypatch.setenv("RATE_LIMIT_PER_MINUTE", "60")
    monkeypatch.setenv("RATE_LIMIT_BURST", "5")
    from shared.http import service

    service.cache_clear()
    yield {
        name: create_app(target=name, source=str(REPO_ROOT / "functions" / name / "main.py")).test_client()
        for name in ("get_task", "fetch_task")
    }
    service.cache_clear()


def headers(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


def test_sixth_request_in_a_burst_of_five_gets_429_with_retry_after(functions):
    get_task = functions["get_task"]
    answers = [get_task.get("/api/tasks/", headers=headers("alice")).status_code for _ in range(5)]

    refused = get_task.get("/api/tasks/", headers=headers("alice"))

    assert answers == [200] * 5
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    body = refused.get_json()
    assert body["error"]["code"] == "rate_limited" and body["error"]["retryable"] is True
    assert body["error"]["details"]["retry_after_s"] == 1


def test_another_key_public_routes_and_the_runner_are_not_held_back_by_one_tenant(functions):
    get_task, fetch_task = functions["get_task"], functions["fetch_task"]
    for _ in range(6):
        get_task.get("/api/tasks/", headers=headers("alice"))
    assert get_task.get("/api/tasks/", headers=headers("alice")).status_code == 429

    assert get_task.get("/api/tasks/", headers=headers("bob")).status_code == 200
    assert all(get_task.get("/api/health").status_code == 200 for _ in range(20))
    assert all(get_task.get("/api/openapi.json").status_code == 200 for _ in range(10))
    runner_answers = {
        fetch_task.get(
            "/api/comm/task/fetch?worker_id=w1&environments=face_swap", headers=headers("runner")
        ).status_code
        for _ in range(20)
    }
    assert runner_answers == {200}


def test_bad_credentials_are_refused_before_they_spend_anyone_s_tokens(functions):
    get_task = functions["get_task"]
    for _ in range(10):
        assert get_task.get("/api/tasks/", headers={"X-API-Key": "csk_wrong"}).status_code == 401

    assert get_task.get("/api/tasks/", headers=headers("alice")).status_code == 200
