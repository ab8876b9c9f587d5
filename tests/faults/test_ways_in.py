"""Issue 13, findings 4, 5 and 9: the ways in before any route runs.

Through real servers (the dev server on gunicorn, the runner on uvicorn), with raw sockets
where a client library would fix the request first (dot segments, chunked bodies):

* a body over MAX_REQUEST_BYTES is a 413 before authentication and before it is read,
  declared or chunked, on function routes, forwarded routes and the runner itself, and
  the server's memory never holds it;
* paths are normalised before any prefix or auth decision: ``..``, ``%2e%2e`` and
  ``..%2f`` cannot carry a request from ``/results/`` to the runner's push endpoint, and
  a pulling runner's push endpoint refuses every caller;
* nested JSON is a 400, and a NUL in a path a 4xx logged as one JSON line.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.keys import api_keys_setting, tenant_keys
from tests.faults.stack import FaultStack, log_events, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEYS = tenant_keys("ways_in", "alice", "admin", "runner")
LIMIT = 2 * 1024 * 1024  # MAX_REQUEST_BYTES of this stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    env = {
        "API_KEYS": api_keys_setting(KEYS),
        "RUNNER_API_KEY": KEYS["runner"],
        "MAX_REQUEST_BYTES": str(LIMIT),
    }
    with running_stack(tmp_path_factory.mktemp("ways-in"), env) as stack:
        yield stack


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_request(
    url: str, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, object]]:
    """One request sent exactly as written (no client normalises the path)."""
    connection = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def send_chunked(url: str, path: str, total_bytes: int, headers: dict[str, str]) -> tuple[int | None, bytes]:
    """POST ``total_bytes`` as a chunked body; the answer is read while the body is still
    going out, as a server that refuses early sends it. Returns (status or None, head)."""
    sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=60)
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    chunk = b"[" * (1024 * 1024)
    sent_all = threading.Event()

    def upload() -> None:
        try:
            for _ in range(total_bytes // len(chunk)):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
            sent_all.set()
        except OSError:
            return  # the server stopped reading: what this test wants

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except OSError:
        pass
    finally:
        sock.close()
        uploader.join(timeout=30)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, answer


# --- 4. body size, before auth and before reading --------------------------------------------


@pytest.mark.parametrize("path", ["/api/tasks/create", "/api/face-swap/process"])
def test_a_declared_body_over_the_cap_is_413_before_auth_and_unread(stack, path):
    # No key, and not one byte of the 500 MB body sent: the answer comes from the header alone.
    status, body = raw_request(stack.api.url, "POST", path, headers={"Content-Length": str(500 * 1024**2)})

    assert status == 413, body
    assert body["error"]["code"] == "body_too_large"
    assert body["error"]["details"]["field"] == "body"


def test_a_chunked_body_over_the_cap_to_the_api_is_refused_without_holding_it(stack):
    before = peak_rss_bytes(stack.api.process.pid)

    status, head = send_chunked(stack.api.url, "/api/face-swap/process", 96 * 1024**2, headers={})

    assert status in (413, None), head  # None: refused so early the connection was reset
    grown = peak_rss_bytes(stack.api.process.pid) - before
    assert grown < 40 * 1024**2, f"the API's peak RSS grew by {grown / 1024**2:.0f} MB"
    assert stack.client.get("/api/health").status_code == 200


def test_a_chunked_body_over_the_cap_to_the_runner_is_refused_without_holding_it(stack):
    before = peak_rss_bytes(stack.runner.process.pid)

    status, head = send_chunked(
        stack.runner.url, "/api/face-swap/process", 96 * 1024**2, headers={"X-API-Key": KEYS["alice"]}
    )

    assert status in (413, None), head
    grown = peak_rss_bytes(stack.runner.process.pid) - before
    assert grown < 40 * 1024**2, f"the runner's peak RSS grew by {grown / 1024**2:.0f} MB"


def test_a_small_chunked_body_over_the_cap_answers_413(stack):
    status, head = send_chunked(stack.api.url, "/api/tasks/create", 3 * 1024**2, headers={})

    assert status == 413, head


# --- 5. paths normalised before any prefix or auth decision ----------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/results/../internal/tasks/run",
        "/results/%2e%2e/internal/tasks/run",
        "/results/..%2finternal/tasks/run",
        "/results/%2E%2E%2Finternal%2Ftasks%2Frun",
        "/results/%252e%252e/internal/tasks/run",
    ],
)
def test_dot_segments_through_the_api_never_reach_the_runners_push_endpoint(stack, path):
    created = stack.client.post(
        "/api/tasks/create",
        json={"workflow": "basic_generation", "task_data": {"prompt": "out of turn"}},
        headers={"X-API-Key": KEYS["alice"]},
    )
    task_id = created.json()["taskId"]  # a `comm` task: this runner (face_swap only) never claims it

    status, body = raw_request(stack.api.url, "POST", path, body=json.dumps({"task_id": task_id}).encode())

    assert status in (400, 404), body
    assert body["error"]["code"] in ("route_not_found", "bad_path")
    view = stack.client.get(f"/api/tasks/{task_id}", headers={"X-API-Key": KEYS["alice"]}).json()
    assert view["status"] == "PENDING" and view["task"]["attempts"] == 0


@pytest.mark.parametrize("who", [None, "alice", "runner", "admin"])
def test_a_pulling_runners_push_endpoint_refuses_everyone(stack, who):
    headers = {"X-API-Key": KEYS[who]} if who else {}

    status, body = raw_request(
        stack.runner.url, "POST", "/internal/tasks/run", headers=headers, body=b'{"task_id": "task_x"}'
    )

    assert status == 403, body
    assert body["error"]["code"] == "push_disabled"


# --- 9. malformed input is a 4xx, logged as one JSON line --------------------------------------


def test_json_nested_a_thousand_deep_is_a_400_naming_the_body(stack):
    status, body = raw_request(
        stack.api.url,
        "POST",
        "/api/tasks/create",
        headers={"X-API-Key": KEYS["alice"], "Content-Type": "application/json"},
        body=b"[" * 1000 + b"]" * 1000,
    )

    assert status == 400, body
    assert body["error"]["details"]["field"] == "body"
    assert "deeper than" in body["error"]["details"]["reason"]


@pytest.mark.parametrize("server", ["api", "runner"])
def test_a_nul_in_a_path_is_a_4xx_and_one_json_log_line(stack, server):
    url = stack.api.url if server == "api" else stack.runner.url

    status, body = raw_request(url, "GET", "/results/%00", headers={"X-API-Key": KEYS["alice"]})

    assert 400 <= status < 500, body
    assert body["success"] is False and body["error"]["code"]
    log = stack.api.log() if server == "api" else stack.runner_log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert not log_events(log, "request_crashed")
