"""Figure 3: what the API costs, as requests per second against a constant function.

create_task, get_task and a bare function returning a constant are each served alone by
functions-framework's gunicorn app with the dev server's options (one worker, 64
threads), as Cloud Functions serves one function per instance, and loaded by the same
generator (``benchmarks.loadgen``) with the same connections and duration, one after
another. create_task and get_task use the embedded store (SQLite, the stack's DATA_DIR).
"""

from __future__ import annotations

import json

from benchmarks.common import PY, REPO, BenchStack, Row, verdict
from benchmarks.loadgen import LoadResult, build_request, run_load
from tests.servers import ServerProcess, free_port, start_server

__all__ = ["api_cost"]

RATIO_TARGET = 0.5


def _serve(stack: BenchStack, name: str, target: str, source: str) -> tuple[int, ServerProcess]:
    port = free_port()
    server = start_server(
        name,
        [PY, "-m", "benchmarks.serve_function", target, source, str(port)],
        url=f"http://127.0.0.1:{port}",
        log_dir=stack.log_dir,
        env={**stack.env, "API_PORT": str(port)},
        health_path="/api/health" if target != "bare" else "/",
        timeout_s=60,
        cwd=REPO,
    )
    return port, server


def _measure(
    stack: BenchStack,
    name: str,
    target: str,
    source: str,
    request: bytes,
    *,
    connections: int,
    duration_s: float,
) -> LoadResult:
    port, server = _serve(stack, name, target, source)
    try:
        host = f"127.0.0.1:{port}"
        payload = request.replace(b"HOST_PLACEHOLDER", host.encode())
        return run_load(port, lambda _: payload, connections=connections, duration_s=duration_s)
    finally:
        server.stop()


def api_cost(stack: BenchStack, *, connections: int = 8, duration_s: float = 4.0) -> list[Row]:
    source_url = stack.put_media("api-source.png", b"")
    body = json.dumps(
        {
            "workflow": "face_swap",
            "environment": "face_swap",
            "task_data": {"source_url": source_url, "target_url": source_url},
        }
    ).encode()
    existing_task = stack.create_face_swap(source_url, source_url)
    functions = REPO / "functions"
    bare = _measure(
        stack,
        "fn-bare",
        "bare",
        str(REPO / "benchmarks" / "bare_function" / "main.py"),
        build_request("GET", "/", "HOST_PLACEHOLDER"),
        connections=connections,
        duration_s=duration_s,
    )
    create = _measure(
        stack,
        "fn-create_task",
        "create_task",
        str(functions / "create_task" / "main.py"),
        build_request("POST", "/api/tasks/create", "HOST_PLACEHOLDER", body, "application/json"),
        connections=connections,
        duration_s=duration_s,
    )
    get = _measure(
        stack,
        "fn-get_task",
        "get_task",
        str(functions / "get_task" / "main.py"),
        build_request("GET", f"/api/tasks/{existing_task}", "HOST_PLACEHOLDER"),
        connections=connections,
        duration_s=duration_s,
    )
    rows = []
    for label, result in (("create_task", create), ("get_task", get)):
        ok = result.statuses.get(200, 0)
        ratio = result.rate / bare.rate if bare.rate else 0.0
        problems = [f"{count}x HTTP {status}" for status, count in result.statuses.items() if status != 200]
        if result.errors:
            problems.append(f"{result.errors} connection errors")
        rows.append(
            Row(
                f"3. API cost, {label} req/s ({connections} connections, {duration_s:g} s)",
                f"{result.rate:,.0f} req/s = {ratio:.2f}x bare"
                + (f" ({', '.join(problems)})" if problems else ""),
                f">= {RATIO_TARGET}x bare",
                f"bare function: {bare.rate:,.0f} req/s",
                verdict(ratio >= RATIO_TARGET and ok == result.requests),
            )
        )
    return rows
