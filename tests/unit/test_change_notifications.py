"""Hand-offs by notification on the embedded store: waiters wake on changes made by
another process, and a waiter with nothing to wait for does no work while it waits.

The other process is a real ``python`` subprocess on the same SQLite file, as the API and
the runner are under `make run`. "No work while waiting" is shown by counting the SQL
statements the waiting connection runs and the datagrams this process receives, not by
timing anything.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.auth import Principal
from shared.dispatch.base import NoopDispatcher
from shared.service import TaskService
from shared.settings import Settings
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task, TaskStatus, utcnow
from tests.waiting_fetches import start_waiting_fetches

REPO = Path(__file__).resolve().parents[2]
OWNER = Principal(owner="key-a", roles=frozenset({"client"}))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteTaskStore]:
    store = SQLiteTaskStore(db_path)
    yield store
    store.close()


def _service(store: SQLiteTaskStore, tmp_path: Path) -> TaskService:
    return TaskService(Settings(data_dir=tmp_path / "data"), store, NoopDispatcher())


def _in_other_process(db_path: Path, body: str) -> subprocess.Popen[str]:
    """Run ``body`` (with ``store`` open on ``db_path``) in a fresh Python process."""
    code = "from shared.store.sqlite import SQLiteTaskStore\nfrom shared.tasks import Task\n"
    code += f"store = SQLiteTaskStore({str(db_path)!r})\n" + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
        stderr=subprocess.PIPE,
    )


def _finished(process: subprocess.Popen[str]) -> None:
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr


def _count_statements(store: SQLiteTaskStore) -> list[str]:
    """Every SQL statement this thread's connection and the store's writing connection run
    from now on."""
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    with store._write_lock:
        store._writer_connection().set_trace_callback(statements.append)
    return statements


def test_a_task_watch_wakes_on_a_change_committed_by_another_process(store, db_path):
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))

    with store.watch_task(task.taskId) as watch:
        other = _in_other_process(db_path, f"store.cancel({task.taskId!r})")
        woke = watch.wait(60.0)
        _finished(other)

    assert woke is True
    assert watch.last is not None and watch.last.status == "CANCELLED"


def test_a_runner_waiting_for_work_wakes_on_a_task_created_by_another_process(store, db_path):
    with store.watch_work(["face_swap"]) as watch:
        other = _in_other_process(
            db_path, "store.create(Task(workflow='face_swap', environment='face_swap', owner='key-a'))"
        )
        woke = watch.wait(60.0)
        _finished(other)

    assert woke is True
    assert store.claim_next(worker_id="runner-1", environments=["face_swap"], lease_seconds=60) is not None


def test_work_of_another_environment_does_not_wake_a_runner(store, db_path):
    with store.watch_work(["comm"]) as watch:
        _finished(
            _in_other_process(
                db_path, "store.create(Task(workflow='face_swap', environment='face_swap', owner='key-a'))"
            )
        )

        assert watch.wait(0.0) is False


def test_long_poll_returns_when_another_process_finishes_the_task(store, db_path, tmp_path):
    service = _service(store, tmp_path)
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))
    other = _in_other_process(
        db_path,
        f"""
        import time
        time.sleep(0.5)  # let the caller's long poll begin; the result is the same either way
        store.cancel({task.taskId!r})
        """,
    )

    ended = service.get_task(task.taskId, principal=OWNER, wait_s=25.0)
    _finished(other)

    assert ended.status == TaskStatus.CANCELLED


def test_a_long_poll_at_idle_reads_the_task_once_and_receives_nothing(store, tmp_path):
    """The old loop re-read the task every 15 ms: about 60 reads in this wait."""
    service = _service(store, tmp_path)
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))
    statements = _count_statements(store)

    still = service.get_task(task.taskId, principal=OWNER, wait_s=1.0)

    assert still.status == TaskStatus.PENDING
    assert len([sql for sql in statements if sql.startswith("SELECT")]) == 1
    assert store._changes.received == 0


def test_a_runner_fetch_at_idle_does_a_fixed_amount_of_work_however_long_it_waits(store, tmp_path):
    """The old loop asked SQLite for other processes' commits every 10 ms (~100 statements
    in this wait); now the wait costs the same few statements whatever its length."""
    service = _service(store, tmp_path)
    statements = _count_statements(store)

    fetched = service.fetch_for_runner(worker_id="runner-1", environments=["face_swap"], wait_s=1.0)

    assert fetched is None
    assert len(statements) <= 12, statements
    assert store._changes.received == 0


def test_a_runner_fetch_wakes_when_a_retry_backoff_ends(store, tmp_path):
    """Nobody publishes the end of a backoff: the wait is bounded by it instead."""
    service = _service(store, tmp_path)
    soon = utcnow() + dt.timedelta(seconds=0.3)
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a", available_at=soon))

    fetched = service.fetch_for_runner(worker_id="runner-1", environments=["face_swap"], wait_s=25.0)

    assert fetched is not None and fetched.taskId == task.taskId


def test_a_dead_waiters_socket_is_removed_by_the_next_writer(store, db_path):
    killed = _in_other_process(
        db_path,
        """
        import os, signal
        unsubscribe = store.subscribe_work(["face_swap"], lambda change: None)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    killed.communicate(timeout=60)
    sockets_before = list(store._changes.directory.glob("*.sock"))

    store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))

    assert sockets_before
    assert list(store._changes.directory.glob("*.sock")) == []


def test_closing_the_last_waiting_store_ends_its_receiver_and_removes_its_folder(db_path):
    store = SQLiteTaskStore(db_path)
    store.subscribe_work(["face_swap"], lambda change: None)
    folder = store._changes.directory
    receivers = [thread for thread in threading.enumerate() if thread.name == "task-change-receiver"]
    assert folder.is_dir()

    store.close()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and all(thread.is_alive() for thread in receivers):
        time.sleep(0.01)
    assert not all(thread.is_alive() for thread in receivers)
    assert not folder.exists()


def test_writes_from_every_thread_go_through_one_connection(store):
    """issue 15: with a connection per thread, each served create wrote on a connection
    whose page cache another thread's commit had just made stale; one writing connection
    (under the store's write lock) keeps the pages an insert touches cached."""
    statements: list[str] = []
    with store._write_lock:
        store._writer_connection().set_trace_callback(statements.append)

    def create() -> None:
        store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len([sql for sql in statements if sql.startswith("INSERT")]) == 4
    assert store.queue_stats().pending == 4


def test_one_new_task_wakes_one_of_many_waiting_fetches_and_a_burst_reaches_them_all(store, tmp_path):
    """Issue 14: the fetch_task long polls of many runners wait in one instance, and each
    new task used to wake them all: every one claimed (in Firestore, all but one lost the
    race). A change now wakes one waiter; the others sleep on, and a burst of tasks still
    reaches every waiter (each that takes a task wakes the next)."""
    service = _service(store, tmp_path)
    threads, fetched, claims = start_waiting_fetches(service, store, 8)
    deadline = time.monotonic() + 30

    first = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))
    while len(claims) < 10 and time.monotonic() < deadline:  # the woken one's, and the next's
        time.sleep(0.01)
    # An observation window, not a wait for something to finish: a waiter woken with the
    # first one claims within milliseconds (the store delivers the change in create()).
    time.sleep(1.0)
    after_first = claims[8:]

    burst = [
        store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a")) for _ in range(7)
    ]
    for thread in threads:
        thread.join(timeout=60)

    # The one woken took it and woke the next, which found nothing (the chain's end).
    assert after_first == [first.taskId, ""], after_first
    assert sorted(task.taskId for task in fetched.values() if task) == sorted(
        task.taskId for task in [first, *burst]
    )


def test_a_wake_its_waiter_did_not_use_goes_to_the_next_waiter(store, tmp_path):
    """Only one waiter is woken per change: if that one leaves without a task (its runner
    hung up), the wake must go on to another, or the task would wait for a deadline."""
    service = _service(store, tmp_path)
    gone = threading.Event()
    results: dict[str, Task | None] = {}

    def fetch(name: str, caller_gone=lambda: False) -> None:
        results[name] = service.fetch_for_runner(
            worker_id=name, environments=["face_swap"], wait_s=25.0, caller_gone=caller_gone
        )

    leaving = threading.Thread(target=fetch, args=("runner-leaving", gone.is_set))
    leaving.start()
    deadline = time.monotonic() + 30

    def waiting() -> int:
        lines = store.__dict__.get("_work_lines", {})
        return sum(1 for line in lines.values() for watch in line._waiters if watch.waiting_since)

    while waiting() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # the first waiter waits longest: the change goes to it
    staying = threading.Thread(target=fetch, args=("runner-staying",))
    staying.start()
    while waiting() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)

    gone.set()
    began = time.monotonic()
    task = store.create(Task(workflow="face_swap", environment="face_swap", owner="key-a"))
    leaving.join(timeout=60)
    staying.join(timeout=60)

    assert results["runner-leaving"] is None
    assert results["runner-staying"] is not None and results["runner-staying"].taskId == task.taskId
    assert time.monotonic() - began < 15, "the task waited for the staying fetch's deadline"
