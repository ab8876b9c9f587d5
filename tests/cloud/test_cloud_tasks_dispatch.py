"""Push dispatch through Cloud Tasks: against the emulator where it is faithful, against
the documented API (a recording client) where it is not.

The emulator (gcloud-tasks-emulator 0.6.2, in its own venv: scripts/install_cloud_tasks_emulator.sh)
really creates the queue and the task and POSTs to a real HTTP server on 127.0.0.1.
Transient failures are real too: the client dials the emulator through a port that
refuses connections until the test opens it (gRPC UNAVAILABLE, then an answer). The
emulator does not de-duplicate task names or send OIDC tokens, so ALREADY_EXISTS and the
OIDC fields are checked against ``CloudTasksClient.create_task``'s documented contract
with a recording client instead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import tasks_v2

from comfyswap.emulators import EmulatorUnavailable, start_cloud_tasks_emulator
from shared.dispatch import NoopDispatcher, make_dispatcher
from shared.dispatch.cloud_tasks import (
    RUNNER_PUSH_PATH,
    CloudTasksDispatcher,
    PoolRoute,
    cloud_task_id,
    make_cloud_tasks_client,
    queue_ids,
    queue_index,
)
from shared.errors import UpstreamUnavailable
from shared.pools import RunnerPool
from shared.settings import Settings
from shared.tasks import Task
from tests.servers import free_port, wait_until

PROJECT = "comfyswap-test"
LOCATION = "us-central1"
INVOKER = "tasks-invoker@comfyswap-test.iam.gserviceaccount.com"


def make_task(**overrides: Any) -> Task:
    return Task(**{"workflow": "face_swap", "environment": "face_swap", **overrides})


# --- the emulator -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cloud_tasks_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a running emulator; ``-r 3`` so a failing target is not retried forever."""
    try:
        emulator = start_cloud_tasks_emulator(tmp_path_factory.mktemp("cloud-tasks-emulator"), max_retries=3)
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield emulator.host
    finally:
        emulator.stop()


class RecordingTarget:
    """The runner's push endpoint as a real HTTP server on 127.0.0.1: records each POST."""

    def __init__(self, status: int = 200) -> None:
        """``status``: what every POST is answered (503: a runner that never takes a task)."""
        self.requests: list[dict[str, Any]] = []
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorded.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def runner_target() -> Iterator[RecordingTarget]:
    target = RecordingTarget()
    yield target
    target.close()


def _settings(emulator_host: str, queue: str, runner_url: str, **overrides: Any) -> Settings:
    return Settings(
        dispatch_mode="push",
        cloud_tasks_emulator_host=emulator_host,
        google_cloud_project=PROJECT,
        cloud_tasks_location=LOCATION,
        cloud_tasks_queue=queue,
        runner_url=runner_url,
        **overrides,
    )


@pytest.mark.emulator
def test_dispatch_delivers_only_the_task_id_to_the_runner(cloud_tasks_emulator, runner_target) -> None:
    queue = f"runner-{uuid.uuid4().hex[:8]}"
    settings = _settings(cloud_tasks_emulator, queue, runner_target.url, cloud_tasks_invoker_email=INVOKER)
    dispatcher = make_dispatcher(settings)
    assert isinstance(dispatcher, CloudTasksDispatcher)
    dispatcher._client.create_queue(
        parent=f"projects/{PROJECT}/locations/{LOCATION}", queue=tasks_v2.Queue(name=dispatcher.queue_path)
    )
    task = make_task(params={"input_data": {"source_url": "https://example.com/a.jpg"}})

    dispatcher.dispatch(task)
    wait_until(lambda: len(runner_target.requests) >= 1, timeout_s=20, what="the emulator's POST")

    delivered = runner_target.requests[0]
    headers = {name.lower(): value for name, value in delivered["headers"].items()}
    assert delivered["path"] == RUNNER_PUSH_PATH
    assert json.loads(delivered["body"]) == {"task_id": task.taskId}
    assert headers["content-type"] == "application/json"
    assert headers["x-cloudtasks-taskname"] == cloud_task_id(task)
    assert headers["x-cloudtasks-queuename"].endswith(queue)
    assert headers["x-cloudtasks-taskretrycount"] == "0"


@pytest.mark.emulator
def test_dispatch_spreads_tasks_over_the_queues_by_environment_and_id(
    cloud_tasks_emulator, runner_target
) -> None:
    """Past one queue's 500 dispatches/s: CLOUD_TASKS_QUEUES lists N queues of the region,
    each task lands in the queue its hash picks (the emulator names the queue in each
    POST), every queue gets some, and a re-dispatch of a task goes to the same queue."""
    prefix = f"runner-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}-{index}" for index in range(4)]
    settings = _settings(
        cloud_tasks_emulator, names[0], runner_target.url, cloud_tasks_queues=",".join(names)
    )
    dispatcher = make_dispatcher(settings)
    assert isinstance(dispatcher, CloudTasksDispatcher)
    assert [path.rsplit("/", 1)[1] for path in dispatcher.queue_paths] == names
    for path in dispatcher.queue_paths:
        dispatcher._client.create_queue(
            parent=f"projects/{PROJECT}/locations/{LOCATION}", queue=tasks_v2.Queue(name=path)
        )
    tasks = [make_task(environment="face_swap" if n % 2 else "comm") for n in range(24)]

    for task in tasks:
        dispatcher.dispatch(task)
    wait_until(lambda: len(runner_target.requests) >= len(tasks), timeout_s=60, what="the emulator's POSTs")

    queue_of: dict[str, str] = {}
    for delivered in runner_target.requests:
        headers = {name.lower(): value for name, value in delivered["headers"].items()}
        queue_of[json.loads(delivered["body"])["task_id"]] = headers["x-cloudtasks-queuename"]
    assert set(queue_of) == {task.taskId for task in tasks}
    for task in tasks:
        assert queue_of[task.taskId].endswith(names[queue_index(task, len(names))]), task.taskId
    assert len(set(queue_of.values())) == len(names), "24 tasks over 4 queues: every queue gets some"
    retried = tasks[0].model_copy(update={"dispatch_generation": 1})
    assert dispatcher.build_cloud_task(retried).name.startswith(
        dispatcher.queue_path_for(tasks[0]) + "/tasks/"
    )


def test_the_queue_hash_is_stable_uniform_and_mixes_the_environment() -> None:
    """sha256 of environment/id, not Python's per-process salted hash(): the functions,
    the reaper and the runner pick the same queue. Spread: 4,000 ids over 8 queues stay
    within 20% of the mean; the same id in another environment may go elsewhere."""
    task = make_task(taskId="task_0123456789abcdef0123456789abcdef")
    assert queue_index(task, 8) == queue_index(task.model_copy(), 8)
    assert queue_index(task, 1) == 0
    counts = [0] * 8
    for _ in range(4000):
        counts[queue_index(make_task(), 8)] += 1
    assert max(counts) <= 1.2 * 500 and min(counts) >= 0.8 * 500, counts
    environments = {queue_index(make_task(taskId=task.taskId, environment=f"env{n}"), 8) for n in range(16)}
    assert len(environments) > 1
    with pytest.raises(ValueError, match="at least one queue"):
        queue_index(task, 0)


def test_queue_ids_read_the_list_in_order_else_the_single_queue() -> None:
    assert queue_ids(Settings(cloud_tasks_queue="q")) == ["q"]
    assert queue_ids(Settings(cloud_tasks_queue="q", cloud_tasks_queues=" q-0, q-1 ,q-2,")) == [
        "q-0",
        "q-1",
        "q-2",
    ]


def test_task_ids_are_random_so_writes_spread_over_the_key_space() -> None:
    """Firestore splits a collection's key range among servers; sequential document ids
    (timestamps, counters) would send every create to the last split. 4,096 new ids are
    all distinct and their first hex digit after task_ covers all 16 values evenly."""
    ids = [make_task().taskId for _ in range(4096)]
    assert len(set(ids)) == len(ids)
    first = [0] * 16
    for task_id in ids:
        assert task_id.startswith("task_")
        first[int(task_id[5], 16)] += 1
    assert min(first) >= 0.7 * 256 and max(first) <= 1.3 * 256, first
    assert sorted(ids) != ids


@pytest.mark.emulator
def test_dispatch_to_a_missing_queue_fails_as_dispatch_failed(cloud_tasks_emulator, runner_target) -> None:
    dispatcher = make_dispatcher(_settings(cloud_tasks_emulator, "no-such-queue", runner_target.url))

    with pytest.raises(UpstreamUnavailable) as raised:
        dispatcher.dispatch(make_task())

    assert raised.value.code == "dispatch_failed"
    assert raised.value.details["error"] == "FailedPrecondition"
    assert raised.value.details["attempts"] == 1, "a permanent error is not retried"
    assert runner_target.requests == []


class LateListener:
    """A loopback port that refuses connections until ``open()``, then relays each one to
    ``target`` (host:port): a Cloud Tasks endpoint that is down, then back."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target, timeout=10)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in [*self._sockets, *([self._listener] if self._listener else [])]:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.mark.emulator
def test_transient_errors_are_retried_until_cloud_tasks_answers(
    cloud_tasks_emulator, runner_target, caplog: pytest.LogCaptureFixture
) -> None:
    """Cloud Tasks unreachable at first (UNAVAILABLE): the enqueue retries with backoff
    (google.api_core.retry) and the task is delivered once the endpoint answers."""
    queue = f"runner-{uuid.uuid4().hex[:8]}"
    admin = make_cloud_tasks_client(_settings(cloud_tasks_emulator, queue, runner_target.url))
    late = LateListener(cloud_tasks_emulator)
    client = make_cloud_tasks_client(_settings(late.host, queue, runner_target.url))
    # A deadline with room for gRPC's own reconnect backoff (1 s, then x1.6) on a busy machine.
    dispatcher = CloudTasksDispatcher(
        client,
        queue_path=client.queue_path(PROJECT, LOCATION, queue),
        target_url=runner_target.url + RUNNER_PUSH_PATH,
        retry_deadline_s=30.0,
    )
    admin.create_queue(
        parent=f"projects/{PROJECT}/locations/{LOCATION}", queue=tasks_v2.Queue(name=dispatcher.queue_path)
    )
    task = make_task()
    opening = threading.Timer(1.0, late.open)
    opening.start()
    try:
        with caplog.at_level(logging.INFO, logger="shared.dispatch.cloud_tasks"):
            dispatcher.dispatch(task)
        wait_until(lambda: len(runner_target.requests) >= 1, timeout_s=20, what="the emulator's POST")
    finally:
        opening.cancel()
        late.close()

    [dispatched] = [record for record in caplog.records if record.getMessage() == "task_dispatched"]
    assert dispatched.attempt >= 2, "the first attempt met a closed port"  # type: ignore[attr-defined]
    assert json.loads(runner_target.requests[0]["body"]) == {"task_id": task.taskId}


def test_cloud_tasks_unreachable_past_the_deadline_is_dispatch_failed() -> None:
    """Nothing listens: every attempt is UNAVAILABLE, retried until the retry deadline, and
    the enqueue then fails as dispatch_failed (retryable) instead of holding the request."""
    settings = _settings(f"127.0.0.1:{free_port()}", "runner", "https://runner.example.com")
    client = make_cloud_tasks_client(settings)
    queue_path = client.queue_path(PROJECT, LOCATION, "runner")
    dispatcher = CloudTasksDispatcher(
        client, queue_path=queue_path, target_url="https://runner.example.com", retry_deadline_s=2.0
    )
    task = make_task()
    started = time.monotonic()

    with pytest.raises(UpstreamUnavailable) as raised:
        dispatcher.dispatch(task)

    assert raised.value.code == "dispatch_failed"
    assert raised.value.retryable is True
    assert raised.value.details["task_id"] == task.taskId
    assert raised.value.details["error"] == "ServiceUnavailable"
    assert raised.value.details["attempts"] >= 2, "transient errors are retried"
    assert time.monotonic() - started < 2.0 + 10.0, "the retry deadline bounds the enqueue"


# --- the documented API, where the emulator is not faithful -----------------------------
class RecordingClient:
    """Stands in for CloudTasksClient.create_task: records calls, raises what it is told."""

    def __init__(self, *outcomes: Exception | None) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[dict[str, Any]] = []

    def create_task(self, *, parent: str, task: tasks_v2.Task, retry: Any, timeout: float) -> tasks_v2.Task:
        self.calls.append({"parent": parent, "task": task, "retry": retry, "timeout": timeout})
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        return task


QUEUE_PATH = f"projects/{PROJECT}/locations/{LOCATION}/queues/runner"


def recording_dispatcher(client: RecordingClient, **overrides: Any) -> CloudTasksDispatcher:
    options: dict[str, Any] = {
        "queue_path": QUEUE_PATH,
        "target_url": "https://runner.example.com" + RUNNER_PUSH_PATH,
        "invoker_email": INVOKER,
        "audience": "https://runner.example.com",
        **overrides,
    }
    return CloudTasksDispatcher(client, **options)


def test_the_cloud_task_carries_ids_only_an_oidc_token_and_the_deadline() -> None:
    dispatcher = recording_dispatcher(RecordingClient(), dispatch_deadline_s=900)
    task = make_task(params={"input_data": {"wf_json": {"1": {"inputs": {"text": "x" * 50_000}}}}})

    cloud_task = dispatcher.build_cloud_task(task)

    assert cloud_task.name == f"{QUEUE_PATH}/tasks/{cloud_task_id(task)}"
    assert cloud_task.http_request.url == "https://runner.example.com" + RUNNER_PUSH_PATH
    assert cloud_task.http_request.http_method == tasks_v2.HttpMethod.POST
    assert cloud_task.http_request.headers["Content-Type"] == "application/json"
    assert json.loads(cloud_task.http_request.body) == {"task_id": task.taskId}
    assert cloud_task.http_request.oidc_token.service_account_email == INVOKER
    assert cloud_task.http_request.oidc_token.audience == "https://runner.example.com"
    assert cloud_task.dispatch_deadline.total_seconds() == 900


def test_without_an_invoker_email_no_oidc_token_is_requested() -> None:
    dispatcher = recording_dispatcher(RecordingClient(), invoker_email="")

    cloud_task = dispatcher.build_cloud_task(make_task())

    assert "oidc_token" not in cloud_task.http_request


def test_each_delivery_of_a_task_gets_its_own_name() -> None:
    """Cloud Tasks keeps a used name for about an hour; a re-queued task needs a new one."""
    task = make_task()
    retried = task.model_copy(update={"attempts": 1, "dispatch_generation": 1})
    # Released after that attempt: the attempt is given back, the generation is not.
    released = task.model_copy(update={"attempts": 0, "dispatch_generation": 2})

    assert len({cloud_task_id(task), cloud_task_id(retried), cloud_task_id(released)}) == 3
    assert cloud_task_id(task) == cloud_task_id(task.model_copy())
    assert task.taskId in cloud_task_id(task)


def test_already_exists_counts_as_dispatched() -> None:
    """The emulator never answers ALREADY_EXISTS (it does not de-duplicate names), so the
    documented answer to a repeated task name is simulated here."""
    client = RecordingClient(gexc.AlreadyExists("task already exists"))
    dispatcher = recording_dispatcher(client)

    dispatcher.dispatch(make_task())

    [call] = client.calls
    assert call["parent"] == QUEUE_PATH
    assert isinstance(call["retry"], Retry), "transient errors are the client's to retry"
    assert call["timeout"] == dispatcher.retry_deadline_s


def test_make_dispatcher_follows_dispatch_mode() -> None:
    pull = make_dispatcher(Settings(dispatch_mode="pull"))
    push = make_dispatcher(
        Settings(
            dispatch_mode="push",
            cloud_tasks_emulator_host="127.0.0.1:9",  # the channel connects lazily
            google_cloud_project="p",
            cloud_tasks_location="europe-west4",
            cloud_tasks_queue="q",
            runner_url="https://runner.example.com/",
        )
    )

    assert isinstance(pull, NoopDispatcher)
    pull.dispatch(make_task())  # nothing to do: runners pull
    assert isinstance(push, CloudTasksDispatcher)
    assert push.queue_path == "projects/p/locations/europe-west4/queues/q"
    assert push.target_url == "https://runner.example.com" + RUNNER_PUSH_PATH
    assert push.audience == "https://runner.example.com"


# --- runner pools across regions (RUNNER_POOLS) ----------------------------------------
EU = "europe-west4"


def _pools_settings(emulator_host: str, pools: list[dict[str, Any]]) -> Settings:
    return Settings(
        dispatch_mode="push",
        cloud_tasks_emulator_host=emulator_host,
        google_cloud_project=PROJECT,
        runner_pools=json.dumps(pools),
    )


def _create_queues(dispatcher: CloudTasksDispatcher, *, skip: frozenset[str] = frozenset()) -> None:
    for route in dispatcher.routes:
        if route.name in skip:
            continue
        for path in route.queue_paths:
            parent = path.split("/queues/", 1)[0]
            dispatcher._client.create_queue(parent=parent, queue=tasks_v2.Queue(name=path))


def _delivered(target: RecordingTarget) -> dict[str, list[str]]:
    """task id -> the queues (X-CloudTasks-QueueName) it was delivered from."""
    seen: dict[str, list[str]] = {}
    for delivered in list(target.requests):
        headers = {name.lower(): value for name, value in delivered["headers"].items()}
        seen.setdefault(json.loads(delivered["body"])["task_id"], []).append(
            headers["x-cloudtasks-queuename"]
        )
    return seen


@pytest.fixture
def eu_target() -> Iterator[RecordingTarget]:
    target = RecordingTarget()
    yield target
    target.close()


def _two_pools(us_url: str, eu_url: str, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "us",
            "location": LOCATION,
            "queues": [f"{tag}-us-0", f"{tag}-us-1"],
            "runner_url": us_url,
            "invoker_email": "invoker-us@comfyswap-test.iam.gserviceaccount.com",
        },
        {
            "name": "eu",
            "location": EU,
            "queues": [f"{tag}-eu"],
            "runner_url": eu_url,
            "invoker_email": "invoker-eu@comfyswap-test.iam.gserviceaccount.com",
        },
    ]


@pytest.mark.emulator
def test_each_task_goes_to_the_queue_and_runner_of_the_pool_its_hash_picks(
    cloud_tasks_emulator, runner_target, eu_target
) -> None:
    """Two regions, each its own queues and runner: every task is delivered once, by a
    queue of its first-choice pool in that pool's location, to that pool's runner, with an
    OIDC token for that pool's invoker and audience; both regions get some."""
    tag = f"pool-{uuid.uuid4().hex[:8]}"
    dispatcher = make_dispatcher(
        _pools_settings(cloud_tasks_emulator, _two_pools(runner_target.url, eu_target.url, tag))
    )
    assert isinstance(dispatcher, CloudTasksDispatcher)
    _create_queues(dispatcher)
    tasks = [make_task(environment="face_swap" if n % 2 else "comm") for n in range(16)]

    for task in tasks:
        dispatcher.dispatch(task)
    wait_until(
        lambda: len(runner_target.requests) + len(eu_target.requests) >= len(tasks),
        timeout_s=60,
        what="the emulator's POSTs",
    )

    us, eu = _delivered(runner_target), _delivered(eu_target)
    assert set(us) | set(eu) == {task.taskId for task in tasks} and not set(us) & set(eu)
    assert us and eu, "16 tasks over two equal pools: each region gets some"
    for task in tasks:
        [first, *_] = dispatcher.routes_for(task)
        [queue] = (us if first.name == "us" else eu)[task.taskId]
        # The emulator names the full queue path: project, the pool's location, the shard.
        assert queue.endswith(first.queue_path_for(task))
        assert f"/locations/{first.pool.location}/" in queue
        token = dispatcher.build_cloud_task(task).http_request.oidc_token
        assert token.audience == first.pool.runner_url
        assert token.service_account_email == first.pool.invoker_email


@pytest.mark.emulator
def test_a_region_whose_queue_refuses_the_enqueue_fails_over_to_the_next_pool(
    cloud_tasks_emulator, runner_target, eu_target, caplog: pytest.LogCaptureFixture
) -> None:
    """The eu region's queue cannot take tasks (here: it does not exist, FAILED_PRECONDITION;
    likewise PERMISSION_DENIED or UNAVAILABLE past the retries): tasks whose first choice is
    eu are delivered once each through the us pool, and nothing is lost."""
    tag = f"pool-{uuid.uuid4().hex[:8]}"
    dispatcher = make_dispatcher(
        _pools_settings(cloud_tasks_emulator, _two_pools(runner_target.url, eu_target.url, tag))
    )
    assert isinstance(dispatcher, CloudTasksDispatcher)
    _create_queues(dispatcher, skip=frozenset({"eu"}))
    tasks = [
        task for task in (make_task() for _ in range(40)) if dispatcher.routes_for(task)[0].name == "eu"
    ][:6]
    assert len(tasks) == 6

    with caplog.at_level(logging.INFO, logger="shared.dispatch.cloud_tasks"):
        for task in tasks:
            dispatcher.dispatch(task)
    wait_until(lambda: len(runner_target.requests) >= len(tasks), timeout_s=60, what="the emulator's POSTs")

    us = _delivered(runner_target)
    assert set(us) == {task.taskId for task in tasks}
    assert all(len(queues) == 1 for queues in us.values()), us
    assert eu_target.requests == []
    failed = [record for record in caplog.records if record.getMessage() == "dispatch_pool_failed"]
    assert [record.pool for record in failed] == ["eu"] * len(tasks)  # type: ignore[attr-defined]
    dispatched = [record for record in caplog.records if record.getMessage() == "task_dispatched"]
    assert [(record.pool, record.failed_over_from) for record in dispatched] == [("us", "eu")] * len(tasks)  # type: ignore[attr-defined]


class LostReplyClient:
    """The real emulator client, except that ``lose_reply_in`` pools' enqueues are stored
    and then reported as timed out: the answer of a create that succeeded never arrived
    (the one way a dispatch can put a task in two pools' queues)."""

    def __init__(self, client: Any, lose_reply_in: str) -> None:
        self._client = client
        self._lose_reply_in = lose_reply_in

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def create_task(self, *, parent: str, task: tasks_v2.Task, retry: Any, timeout: float) -> tasks_v2.Task:
        created: tasks_v2.Task = self._client.create_task(
            parent=parent, task=task, retry=retry, timeout=timeout
        )
        if f"/locations/{self._lose_reply_in}/" in parent:
            raise gexc.RetryError("Timeout of 5.0s exceeded", cause=gexc.DeadlineExceeded("reply lost"))
        return created


@pytest.mark.emulator
def test_a_task_in_two_regions_queues_runs_once_because_the_claim_is_the_fence(
    cloud_tasks_emulator, runner_target, eu_target, tmp_path
) -> None:
    """Cloud Tasks de-duplicates a name within one queue only. A lost reply from the eu
    queue makes the dispatcher fall over to us, so both regions deliver the task; each
    runner claims it in the (real) task store before running anything, and exactly one
    claim wins: one run, the other delivery is dropped."""
    from shared.errors import Conflict
    from shared.store.sqlite import SQLiteTaskStore

    tag = f"pool-{uuid.uuid4().hex[:8]}"
    settings = _pools_settings(cloud_tasks_emulator, _two_pools(runner_target.url, eu_target.url, tag))
    real = make_dispatcher(settings)
    assert isinstance(real, CloudTasksDispatcher)
    _create_queues(real)
    dispatcher = CloudTasksDispatcher(LostReplyClient(real._client, EU), routes=real.routes)
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    task = next(t for t in (make_task() for _ in range(40)) if dispatcher.routes_for(t)[0].name == "eu")
    store.create(task)

    dispatcher.dispatch(task)
    wait_until(
        lambda: len(runner_target.requests) >= 1 and len(eu_target.requests) >= 1,
        timeout_s=60,
        what="a delivery from each region",
    )

    outcomes = []
    for worker_id in ("runner-eu", "runner-us"):
        try:
            store.claim(task.taskId, worker_id=worker_id, lease_seconds=60)
            outcomes.append("claimed")
        except Conflict:
            outcomes.append("dropped")
    assert sorted(outcomes) == ["claimed", "dropped"]
    stored = store.get(task.taskId)
    assert stored is not None and stored.lease is not None and stored.lease.owner == "runner-eu"


def _every_pool_unreachable() -> CloudTasksDispatcher:
    """Two regions' pools whose Cloud Tasks answers nothing (a closed port), within a
    2 s retry deadline."""
    settings = _pools_settings(
        f"127.0.0.1:{free_port()}", _two_pools("https://us.example", "https://eu.example", "down")
    )
    routed = make_dispatcher(settings)
    assert isinstance(routed, CloudTasksDispatcher)
    return CloudTasksDispatcher(routed._client, routes=routed.routes, retry_deadline_s=2.0)


def test_when_every_pool_fails_the_dispatch_fails_naming_each_and_the_task_stays_pending(tmp_path) -> None:
    """Cloud Tasks unreachable in both regions: dispatch_failed (retryable) with each
    pool's error, within the one retry deadline; the stored task is still PENDING for the
    re-dispatch sweep."""
    from shared.store.sqlite import SQLiteTaskStore
    from shared.tasks import TaskStatus

    dispatcher = _every_pool_unreachable()
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    task = store.create(make_task())
    started = time.monotonic()

    with pytest.raises(UpstreamUnavailable) as raised:
        dispatcher.dispatch(task)

    assert raised.value.code == "dispatch_failed" and raised.value.retryable is True
    pools = raised.value.details["pools"]
    assert [entry["pool"] for entry in pools] == [route.name for route in dispatcher.routes_for(task)]
    assert {entry["error"] for entry in pools} == {"ServiceUnavailable"}
    assert time.monotonic() - started < 2.0 + 10.0, "the retry deadline bounds every pool together"
    stored = store.get(task.taskId)
    assert stored is not None and stored.status == TaskStatus.PENDING


def test_a_dispatch_that_failed_in_every_pool_says_so_on_the_task_which_stays_pending(tmp_path) -> None:
    """The client gets its task id; the task itself must say what failed and that it is
    retried (the re-dispatch sweep enqueues it again), not look like any queued task
    while nothing will deliver it until the sweep. A claim clears the error."""
    from shared.auth import Principal
    from shared.service import TaskService
    from shared.store.sqlite import SQLiteTaskStore
    from shared.tasks import TaskStatus

    dispatcher = _every_pool_unreachable()
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    service = TaskService(Settings(data_dir=tmp_path / "data"), store, dispatcher)

    created = service.create_task(
        {"workflow": "basic_generation"}, principal=Principal(owner="a", roles=frozenset({"client"}))
    )

    stored = store.get(created.task.taskId)
    assert stored is not None and stored.status == TaskStatus.PENDING
    assert stored.error is not None
    assert (stored.error.code, stored.error.retryable) == ("dispatch_failed", True)
    assert stored.error.details is not None
    assert [entry["pool"] for entry in stored.error.details["pools"]] == [
        route.name for route in dispatcher.routes_for(stored)
    ]
    assert store.claim(stored.taskId, worker_id="runner-us", lease_seconds=60).error is None


def _comm_only_pools() -> list[dict[str, Any]]:
    """RUNNER_POOLS of one pool that serves comm only."""
    return [
        {
            "name": "comfy",
            "location": EU,
            "queues": ["q"],
            "runner_url": "https://comfy.example",
            "environments": ["comm"],
        }
    ]


def test_a_task_no_pool_serves_ends_failed_saying_so_not_pending_forever(tmp_path) -> None:
    """No runner pool serves the environment (RUNNER_POOLS environments): no dispatch can
    ever succeed, so the task ends FAILED with the reason (not retried), at create and at
    the sweep, instead of staying PENDING and failing every sweep again forever."""
    from shared.dispatch import redispatch_stale_pending
    from shared.service import TaskService
    from shared.store.sqlite import SQLiteTaskStore
    from shared.tasks import TaskStatus

    pools = _comm_only_pools()
    dispatcher = make_dispatcher(_pools_settings(f"127.0.0.1:{free_port()}", pools))
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    service = TaskService(Settings(data_dir=tmp_path / "data"), store, dispatcher)
    at_create = store.create(make_task(owner="a"))
    at_sweep = store.create(make_task(owner="a"))

    service.dispatch_task(at_create)
    report = redispatch_stale_pending(store, dispatcher, older_than_s=0.0)

    assert report.failed == {at_sweep.taskId: "no_runner_pool"}
    for task_id in (at_create.taskId, at_sweep.taskId):
        stored = store.get(task_id)
        assert stored is not None and stored.status == TaskStatus.FAILED
        assert stored.error is not None
        assert (stored.error.code, stored.error.retryable) == ("no_runner_pool", False)


def test_a_task_the_sweep_ends_failed_keeps_no_stored_input(tmp_path) -> None:
    """The scheduled sweep (get_task's /internal/reap) that finds no pool serving a task
    ends it FAILED, and, as a failed dispatch at create does, removes the photos stored
    for it (before, they stayed until the bucket's lifecycle rule)."""
    from shared.auth import Principal
    from shared.service import TaskService
    from shared.store.sqlite import SQLiteTaskStore
    from shared.tasks import TaskStatus
    from tests.large_photo import data_url

    settings = Settings(data_dir=tmp_path / "data")
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    photo = data_url(b"\xff\xd8\xff\xe0 not really a photo", "image/jpeg")
    created = TaskService(settings, store, NoopDispatcher()).create_task(
        {"workflow": "face_swap", "task_data": {"source_url": photo, "target_url": photo}},
        principal=Principal(owner="a", roles=frozenset({"client"})),
    )
    sweeping = TaskService(
        settings, store, make_dispatcher(_pools_settings(f"127.0.0.1:{free_port()}", _comm_only_pools()))
    )
    assert set(sweeping.input_store.stored_task_ids()) == {created.task.taskId}

    report = sweeping.redispatch_stale_pending(0.0)

    assert report.failed == {created.task.taskId: "no_runner_pool"}
    stored = store.get(created.task.taskId)
    assert stored is not None and stored.status == TaskStatus.FAILED
    assert list(sweeping.input_store.stored_task_ids()) == []


def test_a_runner_that_knows_only_its_own_pool_leaves_other_pools_tasks_pending(tmp_path) -> None:
    """Terraform gives each pool's runners their own pool alone (RUNNER_POOLS). A comm-only
    pool's runner, sweeping at start or re-queueing a task, must not end face_swap tasks
    FAILED for "no runner pool": another pool serves them. It leaves them PENDING, without
    an error, for the functions' scheduled sweep, which knows every pool."""
    from gpu_runner.reaper import Reaper
    from shared.storage import make_storage_chain
    from shared.store.sqlite import SQLiteTaskStore
    from shared.tasks import TaskStatus

    pools = _comm_only_pools()
    settings = _pools_settings(f"127.0.0.1:{free_port()}", pools).model_copy(
        update={"data_dir": tmp_path / "data", "runner_environments": ["comm"]}
    )
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    reaper = Reaper(settings, store, make_storage_chain(settings), push=True)
    swept = store.create(make_task(owner="a"))
    requeued = store.create(make_task(owner="a"))

    reaper.sweep_at_start()
    reaper.requeued(requeued)

    for task_id in (swept.taskId, requeued.taskId):
        stored = store.get(task_id)
        assert stored is not None and stored.status == TaskStatus.PENDING
        assert stored.error is None


def test_a_task_no_pool_serves_is_refused_without_an_enqueue() -> None:
    client = RecordingClient()
    only_comm = RunnerPool(
        name="comfy", location=EU, queues=("q",), runner_url="https://comfy.example", environments=("comm",)
    )
    route = PoolRoute(
        only_comm, (f"projects/{PROJECT}/locations/{EU}/queues/q",), "https://comfy.example/x", "", ""
    )
    dispatcher = CloudTasksDispatcher(client, routes=[route])

    with pytest.raises(UpstreamUnavailable) as raised:
        dispatcher.dispatch(make_task(environment="face_swap"))

    assert raised.value.code == "no_runner_pool" and raised.value.retryable is False
    assert client.calls == []


@pytest.mark.emulator
def test_a_region_that_takes_tasks_but_never_runs_them_loses_them_to_the_next_pool_at_the_sweep(
    cloud_tasks_emulator, runner_target, tmp_path
) -> None:
    """The eu queue accepts the task, but eu's runners answer 503 to every push (down,
    out of GPU quota): no enqueue fails, so no failover. The re-dispatch sweep finds the
    task still PENDING, gives it a new dispatch generation, and that delivery starts one
    pool further down its order: the us runner gets it."""
    from shared.dispatch import redispatch_stale_pending
    from shared.store.sqlite import SQLiteTaskStore

    down = RecordingTarget(status=503)
    try:
        tag = f"pool-{uuid.uuid4().hex[:8]}"
        dispatcher = make_dispatcher(
            _pools_settings(cloud_tasks_emulator, _two_pools(runner_target.url, down.url, tag))
        )
        assert isinstance(dispatcher, CloudTasksDispatcher)
        _create_queues(dispatcher)
        store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
        task = store.create(
            next(t for t in (make_task() for _ in range(40)) if dispatcher.routes_for(t)[0].name == "eu")
        )

        dispatcher.dispatch(task)
        wait_until(lambda: len(down.requests) >= 1, timeout_s=30, what="the eu runner's 503")
        assert runner_target.requests == []
        report = redispatch_stale_pending(
            store, dispatcher, older_than_s=0.0, now=task.created_at + dt.timedelta(seconds=1)
        )
        wait_until(lambda: len(runner_target.requests) >= 1, timeout_s=30, what="the us runner's delivery")
    finally:
        down.close()

    assert report.dispatched == [task.taskId]
    assert set(_delivered(runner_target)) == {task.taskId}
    assert _delivered(down).keys() == {task.taskId}
