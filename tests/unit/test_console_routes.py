"""The console's files and the admin stats route, through the real functions-framework."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from shared.errors import JobFailed
from shared.fleet import fleet_stats
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Progress, Task, utcnow

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "console"


def test_console_page_is_served_with_a_strict_policy_and_no_cache(api):
    page = api.clients["get_task"].get("/console")

    assert page.status_code == 200
    assert page.content_type.startswith("text/html")
    assert page.headers["Cache-Control"] == "no-store"
    policy = page.headers["Content-Security-Policy"]
    assert (
        "script-src 'self'" in policy
        and "connect-src 'self'" in policy
        and "frame-ancestors 'none'" in policy
    )
    assert b'src="/console/console.js"' in page.data


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/console/console.js", "text/javascript"), ("/console/console.css", "text/css")],
)
def test_console_assets_are_served_by_name(api, path, content_type):
    answer = api.clients["get_task"].get(path)

    assert answer.status_code == 200
    assert answer.content_type.startswith(content_type)
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/console/secret.py", "/console/__init__.py", "/console/..%2fopenapi.yaml"])
def test_anything_else_under_console_is_not_found(api, path):
    answer = api.clients["get_task"].get(path)

    assert answer.status_code == 404
    assert answer.get_json()["error"]["code"] == "route_not_found"


def test_console_files_ask_for_nothing_from_another_host():
    html = (CONSOLE_DIR / "index.html").read_text()
    css = (CONSOLE_DIR / "console.css").read_text()
    script = (CONSOLE_DIR / "console.js").read_text()

    assert all(url.startswith(("/console/", "#")) for url in re.findall(r'(?:src|href)="([^"]+)"', html))
    assert "url(" not in css and "@import" not in css
    assert not re.findall(r"fetch\(\s*[\"'`]https?:", script)
    # Nothing of a face or a key outlives the tab: only sessionStorage is written.
    assert "localStorage.setItem" not in script and "indexedDB.open" not in script
    assert "revokeObjectURL" in script


def _finished_task(store: SQLiteTaskStore, *, outcome: str, code: str = "no_face_in_source") -> Task:
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="alice"))
    store.claim(task.taskId, worker_id="runner-a", lease_seconds=60)
    if outcome == "completed":
        return store.complete(task.taskId, worker_id="runner-a", output_data={"url": "https://x/y.png"})
    if outcome == "failed":
        return store.fail_or_retry(task.taskId, worker_id="runner-a", error=JobFailed("no face", code=code))
    return store.cancel(task.taskId)


def test_fleet_stats_count_the_last_hour_by_minute_and_failures_by_code(tmp_path):
    store = SQLiteTaskStore(tmp_path / "tasks.db")
    for outcome in ("completed", "completed", "failed", "cancelled"):
        _finished_task(store, outcome=outcome)
    _finished_task(store, outcome="failed", code="storage_unavailable")
    running = store.create(Task(workflow="face_swap", environment="face_swap", owner="bob"))
    store.claim(running.taskId, worker_id="runner-b", lease_seconds=60)
    store.set_progress(
        running.taskId, worker_id="runner-b", progress=Progress(value=2, max=5, stage="frames")
    )
    store.create(Task(workflow="face_swap", environment="face_swap", owner="bob"))

    now = utcnow()
    stats = fleet_stats(store, now=now)
    an_hour_later = fleet_stats(store, now=now + dt.timedelta(hours=1, minutes=2))

    hour = stats["last_hour"]
    assert len(hour["per_minute"]) == 60
    last = hour["per_minute"][-1]
    assert (last["completed"], last["failed"], last["cancelled"]) == (2, 2, 1)
    assert hour["finished"] == {"completed": 2, "failed": 2, "cancelled": 1}
    assert hour["failures_by_code"] == {"no_face_in_source": 1, "storage_unavailable": 1}
    assert stats["queue"]["queue_length"] == 1 and stats["queue"]["oldest_pending_age_s"] is not None
    assert stats["runners"] == [
        {
            "worker_id": "runner-b",
            "in_flight": [
                {
                    "task_id": running.taskId,
                    "status": "FETCHED",
                    "workflow": "face_swap",
                    "progress": {"value": 2, "max": 5, "stage": "frames"},
                    "started_at": None,
                    "lease_expires_at": store.get_or_raise(running.taskId).lease.expires_at.isoformat(),
                }
            ],
        }
    ]
    assert an_hour_later["last_hour"]["finished"] == {"completed": 0, "failed": 0, "cancelled": 0}


def test_admin_stats_route_needs_an_admin_key(api, monkeypatch):
    from shared.auth import hash_api_key
    from shared.http import service
    from shared.settings import reset_settings_cache

    monkeypatch.setenv(
        "API_KEYS",
        f"{hash_api_key('csk_client_k')}:alice:client,{hash_api_key('csk_admin_k')}:ops:admin",
    )
    reset_settings_cache()
    service.cache_clear()
    client = api.clients["get_task"]

    as_client = client.get("/api/admin/stats", headers={"X-API-Key": "csk_client_k"})
    as_admin = client.get("/api/admin/stats", headers={"X-API-Key": "csk_admin_k"})
    anonymous = client.get("/api/admin/stats")

    assert as_client.status_code == 403 and as_client.get_json()["error"]["code"] == "admin_required"
    assert anonymous.status_code == 401
    assert as_admin.status_code == 200
    assert set(as_admin.get_json()) >= {"queue", "last_hour", "runners", "generated_at"}


@pytest.mark.parametrize("engine", ["cpu", "facefusion_api"])
def test_workflows_come_from_get_task_with_the_engines_models(api, monkeypatch, engine):
    from shared.http import service
    from shared.settings import reset_settings_cache
    from shared.workflows import FACE_SWAP_MODELS, supported_models

    monkeypatch.setenv("FACE_SWAP_ENGINE", engine)
    reset_settings_cache()
    service.cache_clear()

    answer = api.clients["get_task"].get("/api/face-swap/workflows")

    body = answer.get_json()
    assert answer.status_code == 200
    assert body["face_swap_models"] == [m for m in FACE_SWAP_MODELS if m in supported_models(engine)]
    assert body["face_swap_models"][0] == "inswapper_128_fp16"
    width = body["workflows"]["invert_image"]["parameters"]["properties"]["width"]
    assert {"maximum": 4096, "minimum": 1, "type": "integer"} in width["anyOf"]
