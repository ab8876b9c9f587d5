"""POST /internal/reap as Cloud Scheduler calls it: an OIDC token of the scheduler's
service account, no API key (issue 12, item 10). The get_task function is served by the
real functions-framework; tokens are signed by a local key whose certificate is served on
127.0.0.1 (tests/cloud/conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from functions_framework import create_app

from tests.cloud.test_oidc import _key_and_certificate, sign

REPO_ROOT = Path(__file__).resolve().parents[2]
AUDIENCE = "https://cswap-get-task-123456789.us-central1.run.app"
SCHEDULER = "cswap-scheduler@comfyswap-prod.iam.gserviceaccount.com"
ADMIN_KEY = "csk_admin_key_for_the_reaper_test"


def _forwarded(token: str) -> str:
    header, payload, _ = token.split(".")
    return f"{header}.{payload}.SIGNATURE_REMOVED_BY_GOOGLE"


@pytest.fixture
def reaper(tmp_path, monkeypatch, certs_url):
    def client(*, on_cloud_run: bool, scheduler_email: str = SCHEDULER):
        environment = {
            "DATA_DIR": str(tmp_path / "data"),
            "TASK_STORE": "sqlite",
            "DISPATCH_MODE": "pull",
            "API_KEYS": f"{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}:ops:admin",
            "REAPER_INVOKER_EMAIL": scheduler_email,
            "REAPER_OIDC_AUDIENCE": AUDIENCE,
            "GOOGLE_OIDC_CERTS_URL": certs_url,
            "CLOUD_RUN_INVOKER_IAM": "true" if on_cloud_run else "false",
        }
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        if on_cloud_run:
            monkeypatch.setenv("K_SERVICE", "cswap-get-task")
        else:
            monkeypatch.delenv("K_SERVICE", raising=False)
        from shared.http import service
        from shared.settings import reset_settings_cache

        reset_settings_cache()
        service.cache_clear()
        app = create_app(target="get_task", source=str(REPO_ROOT / "functions" / "get_task" / "main.py"))
        return app.test_client()

    yield client
    from shared.http import service

    service.cache_clear()


def _reap(client, token: str | None = None, **headers: str):
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post("/internal/reap", json={}, headers=headers)


def test_the_schedulers_forwarded_token_reaps_on_cloud_run(reaper, google_key):
    client = reaper(on_cloud_run=True)

    response = _reap(client, _forwarded(sign(google_key[0], aud=AUDIENCE, email=SCHEDULER)))

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["reaped"] == 0


@pytest.mark.parametrize(
    "claims",
    [
        {"email": "cswap-gateway@comfyswap-prod.iam.gserviceaccount.com"},
        {"aud": "https://cswap-runner.example"},
    ],
    ids=["gateway-account", "other-audience"],
)
def test_other_callers_cannot_reap(reaper, google_key, claims):
    client = reaper(on_cloud_run=True)

    response = _reap(
        client, _forwarded(sign(google_key[0], **{"aud": AUDIENCE, "email": SCHEDULER, **claims}))
    )

    assert response.status_code in (401, 403), response.get_data(as_text=True)


def test_an_admin_api_key_does_not_reap_once_the_schedule_owns_the_route(reaper):
    """The key the schedule used to carry worked on the public gateway too; now no key reaps."""
    client = reaper(on_cloud_run=True)

    response = _reap(client, **{"X-API-Key": ADMIN_KEY})

    assert response.status_code == 401


def test_off_cloud_run_only_a_signed_token_reaps(reaper, google_key):
    client = reaper(on_cloud_run=False)
    token = sign(google_key[0], aud=AUDIENCE, email=SCHEDULER)

    refused = _reap(client, _forwarded(token))
    forged = _reap(client, sign(_key_and_certificate("forger")[0], aud=AUDIENCE, email=SCHEDULER))
    accepted = _reap(client, token)

    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "signature_removed"
    assert forged.status_code == 401
    assert accepted.status_code == 200, accepted.get_data(as_text=True)
