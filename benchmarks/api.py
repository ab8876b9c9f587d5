"""Figure 3: what the API costs, as requests per second against a constant function.

create_task, get_task and a bare function returning a constant are each served alone by
functions-framework's gunicorn app with the dev server's options (one worker, 64
threads), as Cloud Functions serves one function per instance, and loaded by the same
generator (``benchmarks.loadgen``) with the same connections and duration, in rounds
that interleave them. create_task and get_task use the embedded store (SQLite, the
stack's DATA_DIR).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import PY, REPO, BenchStack, Row, median, process_tree_cpu_s, verdict
from benchmarks.loadgen import LoadResult, build_request, run_load
from tests.servers import ServerProcess, free_port, start_server

__all__ = ["api_cost", "create_phase_costs"]

# issue 8 set 0.5x for both; issue 15 raised create_task's to 0.7x.
RATIO_TARGETS = {"create_task": 0.7, "get_task": 0.5}


def _serve(stack: BenchStack, name: str, target: str, source: Path) -> tuple[int, ServerProcess]:
    port = free_port()
    server = start_server(
        name,
        [PY, "-m", "benchmarks.serve_function", target, str(source), str(port)],
        url=f"http://127.0.0.1:{port}",
        log_dir=stack.log_dir,
        env={**stack.env, "API_PORT": str(port)},
        health_path="/api/health" if target != "bare" else "/",
        timeout_s=60,
        cwd=REPO,
    )
    return port, server


def _constant(request: bytes) -> Callable[[int], bytes]:
    return lambda _: request


def api_cost(stack: BenchStack, *, connections: int = 8, rounds: int = 3, round_s: float = 2.0) -> list[Row]:
    """Rounds interleave the three targets (bare, create, get, bare, ...) so that load from
    elsewhere on the machine lands on all of them alike; each figure is the median round."""
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
    targets = {
        "bare": ("bare", REPO / "benchmarks" / "bare_function" / "main.py", "GET", "/", b""),
        "create_task": (
            "create_task",
            functions / "create_task" / "main.py",
            "POST",
            "/api/tasks/create",
            body,
        ),
        "get_task": (
            "get_task",
            functions / "get_task" / "main.py",
            "GET",
            f"/api/tasks/{existing_task}",
            b"",
        ),
    }
    servers: dict[str, tuple[int, ServerProcess]] = {}
    results: dict[str, list[LoadResult]] = {name: [] for name in targets}
    cpu_per_request: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for name, (target, source, *_) in targets.items():
            servers[name] = _serve(stack, f"fn-{name}", target, source)
        for _ in range(rounds):
            for name, (_, _, method, path, payload) in targets.items():
                port = servers[name][0]
                request = build_request(
                    method, path, f"127.0.0.1:{port}", payload, "application/json" if payload else ""
                )
                cpu_before = process_tree_cpu_s(servers[name][1].pid)
                result = run_load(
                    port, _constant(request), connections=connections, duration_s=round_s, warmup_s=0.5
                )
                cpu_used = process_tree_cpu_s(servers[name][1].pid) - cpu_before
                results[name].append(result)
                # Warm-up requests are served too: divide by every request of the round.
                cpu_per_request[name].append(cpu_used / max(1, result.requests_including_warmup))
    finally:
        for _, server in servers.values():
            server.stop()
    phases = create_phase_costs(stack.workdir / "create-phases", body)
    bare_rate = median([result.rate for result in results["bare"]])
    bare_cpu = median(cpu_per_request["bare"])
    rows = []
    for name in ("create_task", "get_task"):
        rate = median([result.rate for result in results[name]])
        cpu = median(cpu_per_request[name])
        ratio = rate / bare_rate if bare_rate else 0.0
        goal = RATIO_TARGETS[name]
        statuses: dict[int, int] = {}
        errors = 0
        for result in results[name]:
            errors += result.errors
            for status, count in result.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        problems = [f"{count}x HTTP {status}" for status, count in statuses.items() if status != 200]
        if errors:
            problems.append(f"{errors} connection errors")
        rows.append(
            Row(
                f"3. API cost, {name} req/s ({connections} connections, median of {rounds} x {round_s:g} s)",
                f"{rate:,.0f} req/s = {ratio:.2f}x bare" + (f" ({', '.join(problems)})" if problems else ""),
                f">= {goal}x bare",
                f"bare function: {bare_rate:,.0f} req/s",
                verdict(ratio >= goal and not problems),
                f"{name}: server CPU per request {cpu * 1e6:.0f} us against {bare_cpu * 1e6:.0f} us "
                f"for the bare function (ratio {bare_cpu / cpu:.2f}; "
                "CPU per request does not move with other load on the machine, requests per second do)"
                + (f"; {phases}" if name == "create_task" else ""),
            )
        )
    return rows


def create_phase_costs(workdir: Path, body: bytes, *, count: int = 400) -> str:
    """CPU microseconds of each step of create_task, in this process, one step at a time
    (what cProfile showed, without its overhead): where the cost over the bare function is.

    A store of its own (``workdir``), so the served function's store is not touched; the
    log line is written as the served process writes it (one JSON line, to a file here).
    """
    import logging
    import os
    import time
    import uuid

    from shared.auth import authenticate
    from shared.http import json_response
    from shared.logs import CloudLoggingFormatter, log_event
    from shared.request_guard import parse_json
    from shared.service import TaskService
    from shared.settings import Settings

    service = TaskService.from_settings(Settings(data_dir=workdir, fetch_allow_loopback=True))
    principal = authenticate({}, service.settings)
    request = service.parse_create(parse_json(body))
    task = service.build_task(request, principal)
    task_json, serialized = service._check_document_size(task)
    log = logging.getLogger("benchmarks.create_phases")
    log.propagate = False
    log.setLevel(logging.INFO)
    sink = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115  # closed below
    sink.setFormatter(CloudLoggingFormatter())
    log.addHandler(sink)

    def store_write() -> None:
        task.taskId = f"task_{uuid.uuid4().hex}"
        service.store.create(task, serialized=serialized)

    def answer() -> object:
        envelope = {"success": True, "taskId": task.taskId, "status": task.status.value}
        return json_response(envelope, 200, {"Location": "/api/tasks/x"}, encoded={"task": task_json})

    steps: list[tuple[str, Callable[[], object]]] = [
        ("JSON and pydantic validation", lambda: service.parse_create(parse_json(body))),
        ("workflow and URL checks", lambda: service.build_task(request, principal)),
        ("serialisation and document size check", lambda: service._check_document_size(task)),
        ("store write (one SQLite commit)", store_write),
        ("the log line", lambda: log_event(log, "task_created", task_id=task.taskId, owner=task.owner)),
        ("answer (Flask response of the stored JSON)", answer),
        (
            "the whole service call (the steps above but the answer; its log line is not written here)",
            lambda: service.create_task(parse_json(body), principal=principal),
        ),
    ]
    parts = []
    try:
        for name, step in steps:
            step()
            started = time.process_time()
            for _ in range(count):
                step()
            parts.append(f"{name} {(time.process_time() - started) / count * 1e6:.0f} us")
    finally:
        log.removeHandler(sink)
        sink.stream.close()
    return (
        "create_task's own steps, CPU per request, in process: "
        + ", ".join(parts)
        + "; served, each costs 1.4 to 4 times its figure here (thread CPU per segment on the "
        "served worker: the server's code between requests evicts theirs from the CPU caches), "
        "and the HTTP layer (gunicorn, Flask, functions-framework) costs the bare function as much"
    )
