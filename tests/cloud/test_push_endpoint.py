"""The runner's push endpoint accepts only Cloud Tasks OIDC tokens for its invoker
account: tokens signed by a locally generated key, certificates served on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.cloud.test_oidc import AUDIENCE, INVOKER, _key_and_certificate, sign


@pytest.fixture
def runner(tmp_path, certs_url):
    """A push-mode runner off Cloud Run and a finished task (a push for it is a no-op)."""
    from shared.tasks import Task

    _, store, _, app = _push_runner(tmp_path, certs_url, cloud_run=False, k_service="", engines={})
    finished = Task(workflow="face_swap", environment="face_swap")
    store.create(finished)
    store.cancel(finished.taskId)
    # The push route needs no started worker, so the app is driven over ASGI directly.
    return app, finished.taskId


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


# --- the token as Cloud Run forwards it (issue 12, item 8) -----------------------------


def _as_cloud_run_forwards(token: str) -> str:
    """Cloud Run verifies the caller's ID token, then hands it to the container with the
    signature part replaced (Cloud Run troubleshooting, "signature removed")."""
    header, payload, _signature = token.split(".")
    return f"{header}.{payload}.SIGNATURE_REMOVED_BY_GOOGLE"


def _push_runner(tmp_path, certs_url, *, cloud_run: bool, k_service: str = "cswap-runner", engines=None):
    from gpu_runner.app import RunnerState, create_app
    from shared.settings import Settings
    from shared.store.sqlite import SQLiteTaskStore

    settings = Settings.model_validate(
        {
            "data_dir": tmp_path,
            "dispatch_mode": "push",
            "cloud_tasks_invoker_email": INVOKER,
            "runner_oidc_audience": AUDIENCE,
            "google_oidc_certs_url": certs_url,
            "cloud_run_invoker_iam": cloud_run,
            "k_service": k_service,
            "face_swap_engine": "cpu",
            "runner_environments": "face_swap",
            "storage_provider": "local",
        }
    )
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    state = RunnerState(settings, store=store, engines=engines)
    return settings, store, state, create_app(settings, state=state)


def _pending_swap_task(settings, store, grace_hopper_path, astronaut_png):
    import base64

    from shared.auth import Principal
    from shared.dispatch.base import NoopDispatcher
    from shared.service import TaskService

    def data_url(path, content_type):
        return f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode()}"

    service = TaskService(settings, store, NoopDispatcher())
    request = service.parse_create(
        {
            "workflow": "face_swap",
            "task_data": {
                "source_url": data_url(grace_hopper_path, "image/jpeg"),
                "target_url": data_url(astronaut_png, "image/png"),
            },
        }
    )
    task = service.build_task(request, Principal(owner="client", roles=frozenset({"client"})))
    store.create(task)
    return task.taskId


def _serve_one_push(state, app, task_id, headers):
    """Start the runner's engines, deliver one push, stop: all in one event loop."""

    async def run() -> httpx.Response:
        await state.start()
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://runner", timeout=300
            ) as client:
                return await client.post("/internal/tasks/run", json={"task_id": task_id}, headers=headers)
        finally:
            await state.stop()

    return asyncio.run(run())


def test_a_forwarded_token_runs_the_task_on_cloud_run(
    tmp_path, certs_url, google_key, grace_hopper_path, astronaut_png, caplog
):
    settings, store, state, app = _push_runner(tmp_path, certs_url, cloud_run=True)
    task_id = _pending_swap_task(settings, store, grace_hopper_path, astronaut_png)
    token = _as_cloud_run_forwards(sign(google_key[0]))

    with caplog.at_level("INFO"):
        response = _serve_one_push(state, app, task_id, {"Authorization": f"Bearer {token}"})

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "COMPLETED"
    task = store.get_or_raise(task_id)
    assert task.status.value == "COMPLETED"
    assert task.output_data["outputs"][0]["content_type"] == "image/png"
    # The queue-wait metric counts task_claimed events: the push path logs one too (item 14).
    claimed = [record for record in caplog.records if getattr(record, "event", None) == "task_claimed"]
    assert [record.task_id for record in claimed] == [task_id]
    assert claimed[0].queue_wait_s is not None and claimed[0].queue_wait_s >= 0


@pytest.mark.parametrize(
    ("cloud_run", "k_service"),
    [(False, "cswap-runner"), (True, ""), (False, "")],
    ids=["cloud-run-without-invoker-iam-setting", "setting-without-cloud-run", "vm-or-local"],
)
def test_a_forwarded_token_is_refused_unless_configured_for_cloud_run(
    tmp_path, certs_url, google_key, cloud_run, k_service
):
    from shared.tasks import Task

    _, store, _, app = _push_runner(tmp_path, certs_url, cloud_run=cloud_run, k_service=k_service, engines={})
    task = Task(workflow="face_swap", environment="face_swap")
    store.create(task)

    response = _push(app, task.taskId, _as_cloud_run_forwards(sign(google_key[0])))

    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "signature_removed"
    assert store.get_or_raise(task.taskId).status.value == "PENDING", "a refused push changes nothing"


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"aud": "https://somewhere-else.example"}, 401),
        ({"iss": "https://evil.example"}, 401),
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, 401),
        ({"iat": int(time.time()) + 3600}, 401),
        ({"email": "gateway@project.iam.gserviceaccount.com"}, 403),
        ({"email_verified": False}, 403),
    ],
    ids=[
        "wrong-audience",
        "wrong-issuer",
        "expired",
        "issued-in-the-future",
        "other-invoker",
        "unverified-email",
    ],
)
def test_a_forwarded_token_still_has_its_claims_checked(tmp_path, certs_url, google_key, claims, status):
    _, store, _, app = _push_runner(tmp_path, certs_url, cloud_run=True, engines={})
    from shared.tasks import Task

    task = Task(workflow="face_swap", environment="face_swap")
    store.create(task)

    response = _push(app, task.taskId, _as_cloud_run_forwards(sign(google_key[0], **claims)))

    assert response.status_code == status, response.text
    assert store.get_or_raise(task.taskId).status.value == "PENDING"


def test_the_serverless_header_is_the_identity_cloud_run_checked(tmp_path, certs_url, google_key):
    """A caller that authenticates with X-Serverless-Authorization gets its Authorization
    header passed through unchecked: a signature-removed invoker token there proves nothing."""
    _, store, _, app = _push_runner(tmp_path, certs_url, cloud_run=True, engines={})
    from shared.tasks import Task

    task = Task(workflow="face_swap", environment="face_swap")
    store.create(task)
    gateway = _as_cloud_run_forwards(sign(google_key[0], email="gateway@project.iam.gserviceaccount.com"))
    forged_invoker = _as_cloud_run_forwards(sign(_key_and_certificate("forger")[0]))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://runner"
        ) as client:
            return await client.post(
                "/internal/tasks/run",
                json={"task_id": task.taskId},
                headers={
                    "X-Serverless-Authorization": f"Bearer {gateway}",
                    "Authorization": f"Bearer {forged_invoker}",
                },
            )

    response = asyncio.run(call())

    assert response.status_code == 403, response.text
    assert store.get_or_raise(task.taskId).status.value == "PENDING"
