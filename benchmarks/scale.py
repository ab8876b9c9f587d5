"""Figure 9: many runners claiming from one Firestore queue in pull mode (issue 14, item 2).

1, 8, 32 and 64 simulated runners, each a thread with its own Firestore client (as
separate runner machines have), run the product's claim path (``claim_next``: a query
for the head of the queue and a write conditioned on the document's update time), hold
each task for a fixed engine time, then complete it with ``complete``. A backlog of tasks
is created first; every runner claims until the queue is empty.

Printed per runner count: claims per second, claim conflicts per successful claim (every
Commit that failed, counted at the gRPC channel: a conditional write that lost to another
runner, FAILED_PRECONDITION, and an aborted commit: a lock timeout or a transaction
retry), how many of those were lost in the runners' first claims (all start together:
each announces itself and counts the others before its first claim, so only those that
count before the others' announcements land take the head), and the checks: every task COMPLETED once
(attempts == 1, one runner claimed it), none lost. Target (issue 14): at 64 runners at
most 0.2 conflicts per claim. Eight tasks per runner: a run long enough that the first
claims' races are not most of it.

``push_rows``: the same runner counts through the push dispatcher (Cloud Tasks emulator).
Read the claims per second with
the emulator in mind: it is one process sharing this machine's cores with the runners'
threads, so it, not the runners, sets the pace; while it is saturated, the time between a
claimer's query and its write holds other runners' requests queued before it, so more
claims land in that window than in Firestore's.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import Row, environment, machine_busy_s, not_measured

__all__ = ["scale_rows"]

RUNNER_COUNTS = (1, 8, 32, 64)
TASKS_PER_RUNNER = 8
MIN_TASKS = 32
ENGINE_S = 0.05
CONFLICT_TARGET = 0.2


def _conflict_interceptor(counter: collections.Counter[str], lock: threading.Lock) -> Any:
    import grpc  # type: ignore[import-untyped]  # grpcio ships no type hints

    class Counting(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]  # untyped bases
        def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            with lock:
                counter["requests"] += 1  # RunQuery, BatchGetDocuments
            return continuation(details, request)

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            call = continuation(details, request)
            with lock:
                counter["requests"] += 1
            if str(details.method).endswith("/Commit"):
                error = call.exception()
                with lock:
                    counter["commits"] += 1
                    if error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        counter["conflicts"] += 1
                    elif error is not None and error.code() == grpc.StatusCode.ABORTED:
                        counter["aborted"] += 1
            return call

    return Counting()


@contextlib.contextmanager
def counting_stores(
    project: str, collection: str, count: int
) -> Iterator[tuple[list[Any], collections.Counter[str]]]:
    """``count`` FirestoreTaskStores on the emulator, each with its own client (as runner
    machines have), whose Commits are counted: ``commits``, ``conflicts`` (a conditional
    write that lost: FAILED_PRECONDITION) and ``aborted`` (a lock timeout or a
    transaction retry). tests/cloud uses it too."""
    import grpc
    from google.cloud import firestore
    from google.cloud.firestore_v1.base_client import BaseClient

    from shared.store.firestore import FirestoreTaskStore

    counter: collections.Counter[str] = collections.Counter()
    original_channel = BaseClient._emulator_channel

    def channel(self: Any, transport: Any) -> Any:
        return grpc.intercept_channel(
            original_channel(self, transport),  # type: ignore[no-untyped-call]  # the client is untyped
            _conflict_interceptor(counter, threading.Lock()),
        )

    BaseClient._emulator_channel = channel  # type: ignore[method-assign]
    try:
        stores = [
            FirestoreTaskStore(firestore.Client(project=project), collection=collection) for _ in range(count)
        ]
        # The client opens its channel lazily, at its first request: open it here, while
        # the counting channel is in place (otherwise no Commit is ever counted).
        for store in stores:
            store._client._firestore_api  # noqa: B018  # the property builds the channel
    finally:
        BaseClient._emulator_channel = original_channel  # type: ignore[method-assign]
    try:
        yield stores, counter
    finally:
        for store in stores:
            store.close()


def _process_group_cpu_s(group: int) -> float:
    """CPU seconds used so far by the processes of one group (the emulator: a launcher
    and its JVM), from /proc; 0.0 where /proc is not there."""
    import os

    total = 0
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / ticks


def _one_count(project: str, runners: int, emulator_group: int = 0) -> dict[str, Any]:
    from google.cloud import firestore

    from shared.store.firestore import FirestoreTaskStore
    from shared.tasks import Task, TaskStatus

    lock = threading.Lock()
    collection = f"scale_{runners}_{int(time.time() * 1000)}"
    setup = FirestoreTaskStore(firestore.Client(project=project), collection=collection)
    total = max(MIN_TASKS, TASKS_PER_RUNNER * runners)
    task_ids = [
        setup.create(Task(workflow="face_swap", environment="face_swap")).taskId for _ in range(total)
    ]
    with counting_stores(project, collection, runners) as (stores, counter):
        emulator_cpu_s, client_cpu_s = _process_group_cpu_s(emulator_group), time.process_time()
        busy_s = machine_busy_s()
        result = _run_runners(stores, lock)
        busy_s = machine_busy_s() - busy_s
        # What the simulation (figure 10) is built from: requests per claim, and each
        # request's CPU on the emulator and in this process (the runners' client side).
        result["emulator_cpu_s"] = _process_group_cpu_s(emulator_group) - emulator_cpu_s
        result["client_cpu_s"] = time.process_time() - client_cpu_s
        result["requests"] = counter["requests"]
        # The other engineers' processes on this shared machine: CPU they took meanwhile.
        result["others_cpu_s"] = max(0.0, busy_s - result["emulator_cpu_s"] - result["client_cpu_s"])
        result["conflicts"], result["aborted"] = counter["conflicts"], counter["aborted"]
    final = [setup.get(task_id) for task_id in task_ids]
    setup.close()
    claimed_by = result.pop("claimed_by")
    claims = sum(len(owners) for owners in claimed_by.values())
    return {
        **result,
        "runners": runners,
        "tasks": total,
        "claims": claims,
        "claims_per_s": claims / result["elapsed"] if result["elapsed"] > 0 else 0.0,
        "duplicates": sum(1 for owners in claimed_by.values() if len(owners) > 1),
        "lost": sum(
            1 for task in final if task is None or task.status != TaskStatus.COMPLETED or task.attempts != 1
        ),
    }


def _run_runners(stores: list[Any], lock: threading.Lock) -> dict[str, Any]:
    """Every store claims until the queue is empty, holding each task ENGINE_S."""
    runners = len(stores)
    claimed_by: dict[str, list[str]] = collections.defaultdict(list)
    errors: list[str] = []
    cold_start = [0] * runners
    start = threading.Barrier(runners + 1)

    def runner(index: int, store: Any) -> None:
        worker_id = f"runner-{index}"
        start.wait()
        first = True
        while True:
            try:
                task = store.claim_next(worker_id=worker_id, environments=["face_swap"], lease_seconds=120)
            except Exception as exc:
                errors.append(f"{worker_id}: {type(exc).__name__}: {exc}")
                return
            if first:
                # Races lost in each runner's first claim: all start at once, and one
                # that counts no other announced runner takes the head (a lone claimer's order).
                cold_start[index], first = store.claim_conflicts, False
            if task is None:
                return
            with lock:
                claimed_by[task.taskId].append(worker_id)
            time.sleep(ENGINE_S)
            store.complete(task.taskId, worker_id=worker_id, output_data={"url": "https://example.com/r.png"})

    threads = [threading.Thread(target=runner, args=(i, s), daemon=True) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=600)
    return {
        "elapsed": time.perf_counter() - started,
        "claimed_by": claimed_by,
        "cold_start_conflicts": sum(cold_start),
        "errors": errors[:3],
    }


def _pull_row(runners: int, result: dict[str, Any]) -> Row:
    lost_races = result["conflicts"] + result["aborted"]
    per_claim = lost_races / max(1, result["claims"])
    checks_ok = not result["duplicates"] and not result["lost"] and not result["errors"]
    meets = checks_ok and (runners < 64 or per_claim <= CONFLICT_TARGET)
    return Row(
        f"9. many runners, pull mode on the Firestore emulator: {runners} runner(s), "
        f"{result['tasks']} tasks of {ENGINE_S * 1000:.0f} ms",
        f"{result['claims_per_s']:.1f} claims/s; {per_claim:.2f} conflicts per claim "
        f"({result['conflicts']} lost compare-and-sets + {result['aborted']} aborted commits; "
        f"{result['cold_start_conflicts']} of the lost claims in the runners' first claims); "
        f"{result['duplicates']} claimed twice, {result['lost']} lost"
        + (f"; errors: {result['errors']}" if result["errors"] else ""),
        f"no duplicate, none lost{'; <= 0.2 conflicts per claim' if runners == 64 else ''}",
        "",
        "meets" if meets else "MISSES",
        note="the emulator (one process on this machine) sets the claim rate. Every runner "
        "starts at once; one that counts another runner's announcement, or loses a race, "
        "claims from random claim shards, one that counts none takes the head (a lone "
        "claimer's order)",
    )


def scale_rows(workdir: Path, results: list[dict[str, Any]] | None = None) -> list[Row]:
    """Figure 9's rows; each runner count's raw figures are appended to ``results``
    (figure 10, the simulation, is checked against them)."""
    from comfyswap.emulators import EmulatorUnavailable, start_firestore_emulator

    try:
        emulator = start_firestore_emulator(workdir)
    except EmulatorUnavailable as exc:
        return [not_measured("9. many runners, pull mode", str(exc))]
    rows: list[Row] = []
    try:
        with environment({"FIRESTORE_EMULATOR_HOST": emulator.host}):
            # A first pass, not reported: the emulator's JVM compiles its hot paths during the
            # first few hundred requests, which would slow whichever count ran first.
            _one_count(emulator.project, 8, emulator.server.pid)
            for runners in RUNNER_COUNTS:
                result = _one_count(emulator.project, runners, emulator.server.pid)
                if results is not None:
                    results.append(result)
                rows.append(_pull_row(runners, result))
    finally:
        emulator.stop()
    return rows


# --- the push half: one delivery per task through Cloud Tasks (issue 14, item 2) ------------


def _push_count(project: str, cloud_tasks: Any, runners: int, emulator_group: int) -> dict[str, Any]:
    """``runners`` runner slots behind one push endpoint, fed by the product's dispatcher
    through the Cloud Tasks emulator; each delivery is claimed by name (``store.claim``:
    the push claim's transaction), held ENGINE_S, completed, and answered 200.

    The emulator delivers one task at a time per queue, so the dispatcher gets one queue
    per runner (``queue_index`` spreads the tasks over them), as Cloud Tasks' concurrent
    dispatches would feed every runner. A busy endpoint makes the delivery wait for a
    free slot (Cloud Run queues a request for a busy instance briefly)."""
    import http.server
    import json
    import queue as queues
    import uuid

    from google.cloud import firestore

    from shared.dispatch.cloud_tasks import CloudTasksDispatcher
    from shared.errors import Conflict
    from shared.store.firestore import FirestoreTaskStore
    from shared.tasks import Task, TaskStatus

    collection = f"push_{runners}_{int(time.time() * 1000)}"
    setup = FirestoreTaskStore(firestore.Client(project=project), collection=collection)
    total = max(MIN_TASKS, TASKS_PER_RUNNER * runners)
    claimed_by: dict[str, list[str]] = collections.defaultdict(list)
    deliveries: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    with counting_stores(project, collection, runners) as (stores, counter):
        free: queues.Queue[tuple[int, Any]] = queues.Queue()
        for index, store in enumerate(stores):
            free.put((index, store))

        class Endpoint(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the http.server hook's name
                task_id = str(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["task_id"])
                index, store = free.get()
                worker_id = f"runner-{index}"
                try:
                    store.claim(task_id, worker_id=worker_id, lease_seconds=120)
                    with lock:
                        claimed_by[task_id].append(worker_id)
                    time.sleep(ENGINE_S)
                    store.complete(
                        task_id, worker_id=worker_id, output_data={"url": "https://example.com/r.png"}
                    )
                    outcome = "claimed"
                except Conflict:
                    outcome = "duplicate delivery"  # at least once: the task was claimed already
                finally:
                    free.put((index, store))
                with lock:
                    deliveries[outcome] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # the hook's signature
                return None

        endpoint = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
        threading.Thread(target=endpoint.serve_forever, daemon=True).start()
        names = [
            cloud_tasks.create_queue(f"push-{uuid.uuid4().hex[:8]}", project=project) for _ in range(runners)
        ]
        dispatcher = CloudTasksDispatcher(
            cloud_tasks.client, queue_path=names, target_url=f"http://127.0.0.1:{endpoint.server_port}/push"
        )
        tasks = [setup.create(Task(workflow="face_swap", environment="face_swap")) for _ in range(total)]
        emulator_cpu_s, client_cpu_s = _process_group_cpu_s(emulator_group), time.process_time()
        started = time.perf_counter()
        for task in tasks:
            dispatcher.dispatch(task)
        deadline = time.monotonic() + 600
        while sum(len(owners) for owners in claimed_by.values()) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        while deliveries.total() < sum(len(owners) for owners in claimed_by.values()):
            time.sleep(0.01)  # the last completions are being answered
        elapsed = time.perf_counter() - started
        result = {
            "elapsed": elapsed,
            "emulator_cpu_s": _process_group_cpu_s(emulator_group) - emulator_cpu_s,
            "client_cpu_s": time.process_time() - client_cpu_s,
            "requests": counter["requests"],
            "conflicts": counter["conflicts"],
            "aborted": counter["aborted"],
        }
        endpoint.shutdown()
        endpoint.server_close()
    final = [setup.get(task.taskId) for task in tasks]
    setup.close()
    claims = sum(len(owners) for owners in claimed_by.values())
    return {
        **result,
        "runners": runners,
        "tasks": total,
        "claims": claims,
        "claims_per_s": claims / elapsed if elapsed > 0 else 0.0,
        "duplicate_deliveries": deliveries["duplicate delivery"],
        "duplicates": sum(1 for owners in claimed_by.values() if len(owners) > 1),
        "lost": sum(
            1 for task in final if task is None or task.status != TaskStatus.COMPLETED or task.attempts != 1
        ),
    }


def _push_row(runners: int, result: dict[str, Any]) -> Row:
    per_claim = (result["conflicts"] + result["aborted"]) / max(1, result["claims"])
    return Row(
        f"9. many runners, push mode (Cloud Tasks emulator, one queue per runner): {runners} "
        f"runner(s), {result['tasks']} tasks of {ENGINE_S * 1000:.0f} ms",
        f"{result['claims_per_s']:.1f} claims/s; {per_claim:.2f} conflicts per claim "
        f"({result['conflicts']} lost compare-and-sets + {result['aborted']} aborted commits); "
        f"{result['duplicate_deliveries']} duplicate deliveries refused; "
        f"{result['duplicates']} claimed twice, {result['lost']} lost",
        "no duplicate, none lost",
        "",
        "meets" if not result["duplicates"] and not result["lost"] else "MISSES",
        note="each delivery names its task: no runner races another for it. Timed from the "
        "first enqueue (the product's dispatcher) to the last completion; the emulator "
        "delivers one task at a time per queue and polls each queue every 0.1 s",
    )


def push_rows(workdir: Path) -> list[Row]:
    """Figure 9's push rows: the same runner counts through a push dispatcher."""
    from comfyswap.emulators import EmulatorUnavailable, start_cloud_tasks_emulator, start_firestore_emulator

    try:
        emulator = start_firestore_emulator(workdir)
    except EmulatorUnavailable as exc:
        return [not_measured("9. many runners, push mode", str(exc))]
    try:
        cloud_tasks = start_cloud_tasks_emulator(workdir, max_retries=3)
    except EmulatorUnavailable as exc:
        emulator.stop()
        return [not_measured("9. many runners, push mode", str(exc))]
    rows: list[Row] = []
    try:
        with environment({"FIRESTORE_EMULATOR_HOST": emulator.host}):
            for runners in RUNNER_COUNTS:
                result = _push_count(emulator.project, cloud_tasks, runners, emulator.server.pid)
                rows.append(_push_row(runners, result))
    finally:
        cloud_tasks.stop()
        emulator.stop()
    return rows
