"""The embedded task store: one SQLite file in WAL mode, safe across threads and processes.

Writers serialise on ``BEGIN IMMEDIATE`` (SQLite's reserved lock), so a claim's
select-then-update can never interleave with another claim, in this process or any
other. Each row keeps the whole task document as JSON plus the columns the queue
queries need, indexed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from shared.errors import NotFound
from shared.store.base import DEFAULT_RETENTION, Claim, Mutation, TaskStore, leased_copy
from shared.store.notify import ChangeBus, Listener, TaskChange
from shared.tasks import LEASED_STATUSES, QueueStats, Task, TaskStatus, utcnow

__all__ = ["SQLiteTaskStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id          TEXT PRIMARY KEY,
    status           TEXT NOT NULL,
    environment      TEXT NOT NULL,
    priority         INTEGER NOT NULL,
    available_at     REAL NOT NULL,
    created_at       REAL NOT NULL,
    lease_expires_at REAL,
    owner            TEXT NOT NULL,
    idempotency_key  TEXT,
    document         TEXT NOT NULL,
    expire_at        REAL
);
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (status, environment, priority DESC, available_at);
CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (status, lease_expires_at);
CREATE INDEX IF NOT EXISTS tasks_available ON tasks (status, available_at);
CREATE INDEX IF NOT EXISTS tasks_owner ON tasks (owner, created_at);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""
# Files made before finished tasks expired lack the column; added in place.
_EXPIRE_INDEX = "CREATE INDEX IF NOT EXISTS tasks_expire ON tasks (expire_at) WHERE expire_at IS NOT NULL"


def _ts(value: dt.datetime) -> float:
    return value.timestamp()


class SQLiteTaskStore(TaskStore):
    # A subscription is a listener in this process's ChangeBus (the first one binds its socket).
    subscribes_in_process = True

    def __init__(
        self, path: Path | str, *, busy_timeout_s: float = 30.0, retention: dt.timedelta = DEFAULT_RETENTION
    ) -> None:
        self.path = Path(path)
        self.retention = retention
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        # Writers queue on locks, not on SQLite's busy handler: that one retries a busy
        # BEGIN IMMEDIATE (or INSERT) after sleeping 1, 2, 5, 10, 15... ms, so a write that
        # met another process's (the API creating while the runner completes) waited 2 to
        # 20 ms for a lock held 0.1 ms (figure 8, 8 clients: creates p90 11 ms). This
        # process's writers queue on an RLock; every process's on an flock of
        # ``<file>.write-lock``, where the kernel wakes the next writer the moment it is
        # free. The busy timeout stays for anything else that writes the file.
        self._write_lock = threading.RLock()
        self._file_lock: int | None = None
        self._file_lock_pid = 0
        self._file_lock_depth = 0
        # Every write of this process goes through one connection, under that lock: its
        # page cache holds the index pages an insert touches. With a connection per thread,
        # a write often landed on a connection whose cache another thread's commit had just
        # made stale, and read those pages again (8 threads creating: 3 to 8% more CPU).
        self._writer: sqlite3.Connection | None = None
        self._writer_pid = 0
        # Every commit is published to the waiters of this file in every process
        # (shared.store.notify explains the mechanism).
        self._changes = ChangeBus(str(self.path.resolve()))
        with self._connection() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
            if "expire_at" not in columns:
                conn.execute("ALTER TABLE tasks ADD COLUMN expire_at REAL")
            conn.execute(_EXPIRE_INDEX)

    # --- connections ------------------------------------------------------------------
    def _open(self, *, check_same_thread: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_s,
            isolation_level=None,
            check_same_thread=check_same_thread,
        )
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
        return conn

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, for reads."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open(check_same_thread=True)
        return conn

    def _writer_connection(self) -> sqlite3.Connection:
        """The process's one writing connection; only used with ``_write_lock`` held."""
        if self._writer is None or self._writer_pid != os.getpid():
            # A forked child (gunicorn's worker) must not share its parent's connection.
            self._writer, self._writer_pid = self._open(check_same_thread=False), os.getpid()
        return self._writer

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The writing connection, with this process's write lock and the file's held."""
        with self._write_lock:
            if self._file_lock is None or self._file_lock_pid != os.getpid():
                # A forked child gets its own open file: an inherited one shares the lock.
                self._file_lock = os.open(f"{self.path}.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
                self._file_lock_pid, self._file_lock_depth = os.getpid(), 0
            lock = self._file_lock
            if self._file_lock_depth == 0:
                fcntl.flock(lock, fcntl.LOCK_EX)  # waits in the kernel, without the GIL
            self._file_lock_depth += 1
            try:
                yield self._writer_connection()
            finally:
                self._file_lock_depth -= 1
                if self._file_lock_depth == 0:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._write_lock:
            if self._writer is not None and self._writer_pid == os.getpid():
                self._writer.close()
            self._writer = None
            if self._file_lock is not None and self._file_lock_pid == os.getpid():
                os.close(self._file_lock)
            self._file_lock = None
        self._changes.close()

    # --- rows -------------------------------------------------------------------------
    def _row_values(self, task: Task, serialized: str | None = None) -> tuple[object, ...]:
        expire_at = self.expire_at(task)
        return (
            task.status.value,
            task.environment,
            task.priority,
            _ts(task.available_at),
            _ts(task.created_at),
            _ts(task.lease.expires_at) if task.lease else None,
            task.owner,
            task.idempotency_key,
            serialized if serialized is not None else json.dumps(task.to_document()),
            _ts(expire_at) if expire_at else None,
            task.taskId,
        )

    def _write_row(self, conn: sqlite3.Connection, task: Task) -> None:
        conn.execute(
            "UPDATE tasks SET status=?, environment=?, priority=?, available_at=?, created_at=?, "
            "lease_expires_at=?, owner=?, idempotency_key=?, document=?, expire_at=? WHERE task_id=?",
            self._row_values(task),
        )

    @staticmethod
    def _load(document: str) -> Task:
        return Task.from_document(json.loads(document))

    def _publish(self, task: Task) -> None:
        self._changes.publish(
            TaskChange(
                task.taskId,
                task.status.value,
                task.environment,
                _ts(task.available_at),
                task.lease.owner if task.lease else "",
            )
        )

    # --- primitives -------------------------------------------------------------------
    def create(self, task: Task, *, serialized: str | None = None) -> Task:
        values = self._row_values(task, serialized)
        try:
            # One statement is its own transaction (autocommit): no BEGIN/COMMIT round trips.
            with self._writing() as conn:
                conn.execute(
                    "INSERT INTO tasks (status, environment, priority, available_at, created_at, "
                    "lease_expires_at, owner, idempotency_key, document, expire_at, task_id) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    values,
                )
        except sqlite3.IntegrityError as exc:
            raise self.creation_conflict(task) from exc
        self._publish(task)
        return task

    def get(self, task_id: str) -> Task | None:
        row = self._connection().execute("SELECT document FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        return self._load(row[0]) if row else None

    def update(self, task_id: str, mutate: Mutation) -> Task:
        with self._write() as conn:
            row = conn.execute("SELECT document FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if row is None:
                raise NotFound(
                    f"task {task_id} not found", code="task_not_found", details={"task_id": task_id}
                )
            updated = mutate(self._load(row[0]))
            self._write_row(conn, updated)
        self._publish(updated)
        return updated

    def _claim(self, claim: Claim) -> Task | None:
        envs, now, cap = claim.environments, claim.now, claim.max_running_per_owner
        marks = ",".join("?" * len(envs))
        with self._write() as conn:
            # Each owner's best task (priority, then age), then owners in turn: fewest
            # claimed tasks first, the longest-waiting head next (TaskStore.claim_next).
            fair_head = (
                "WITH running AS (SELECT owner, COUNT(*) AS n FROM tasks "  # noqa: S608  # only '?' marks go in
                "WHERE status IN ('FETCHED','PROCESSING') GROUP BY owner), "
                "heads AS (SELECT document, owner, available_at, ROW_NUMBER() OVER "
                "(PARTITION BY owner ORDER BY priority DESC, available_at ASC) AS place FROM tasks "
                "WHERE status='PENDING' AND environment IN (" + marks + ") AND available_at <= ?) "
                "SELECT heads.document FROM heads LEFT JOIN running ON running.owner = heads.owner "
                "WHERE heads.place = 1 AND (? = 0 OR COALESCE(running.n, 0) < ?) "
                "ORDER BY COALESCE(running.n, 0) ASC, heads.available_at ASC LIMIT 1"
            )
            row = conn.execute(
                fair_head,
                (*envs, _ts(now), cap, cap),
            ).fetchone()
            if row is None:
                return None
            claimed = leased_copy(self._load(row[0]), claim.worker_id, claim.lease_seconds, now)
            self._write_row(conn, claimed)
        self._publish(claimed)
        return claimed

    def list_tasks(
        self, *, owner: str | None = None, statuses: Iterable[TaskStatus] | None = None, limit: int = 50
    ) -> list[Task]:
        clauses: list[str] = []
        args: list[object] = []
        if owner is not None:
            clauses.append("owner = ?")
            args.append(owner)
        status_list = [s.value for s in statuses] if statuses is not None else None
        if status_list:
            clauses.append(f"status IN ({','.join('?' * len(status_list))})")
            args.extend(status_list)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._connection().execute(
            f"SELECT document FROM tasks {where} ORDER BY created_at DESC LIMIT ?",  # noqa: S608  # clauses are constants
            (*args, limit),
        )
        return [self._load(row[0]) for row in rows]

    def queue_stats(self, *, owner: str | None = None) -> QueueStats:
        where, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        conn = self._connection()
        counts = dict(
            conn.execute(f"SELECT status, COUNT(*) FROM tasks {where} GROUP BY status", args).fetchall()  # noqa: S608  # `where` is a constant
        )
        pending_where = "WHERE status='PENDING'" + (" AND owner = ?" if owner is not None else "")
        oldest = conn.execute(f"SELECT MIN(created_at) FROM tasks {pending_where}", args).fetchone()[0]  # noqa: S608
        return QueueStats(
            **{status.value.lower(): int(counts.get(status.value, 0)) for status in TaskStatus},
            oldest_pending_age_s=(utcnow().timestamp() - oldest) if oldest is not None else None,
        )

    def find_by_idempotency_key(self, owner: str, key: str) -> Task | None:
        row = (
            self._connection()
            .execute("SELECT document FROM tasks WHERE owner=? AND idempotency_key=?", (owner, key))
            .fetchone()
        )
        return self._load(row[0]) if row else None

    def expired_lease_ids(self, now: dt.datetime, limit: int = 100) -> list[str]:
        leased = tuple(status.value for status in LEASED_STATUSES)
        return self._ids(
            "SELECT task_id FROM tasks WHERE status IN (?, ?) AND lease_expires_at < ? LIMIT ?",
            (*leased, _ts(now), limit),
        )

    def pending_ids_available_before(self, cutoff: dt.datetime, limit: int = 100) -> list[str]:
        return self._ids(
            "SELECT task_id FROM tasks WHERE status='PENDING' AND available_at < ? "
            "ORDER BY available_at LIMIT ?",
            (_ts(cutoff), limit),
        )

    def expired_task_ids(self, now: dt.datetime, limit: int = 100) -> list[str]:
        return self._ids(
            "SELECT task_id FROM tasks WHERE expire_at IS NOT NULL AND expire_at <= ? "
            "ORDER BY expire_at LIMIT ?",
            (_ts(now), limit),
        )

    def _ids(self, query: str, args: tuple[object, ...]) -> list[str]:
        return [row[0] for row in self._connection().execute(query, args)]

    def delete(self, task_id: str) -> bool:
        with self._writing() as conn:
            cursor = conn.execute("DELETE FROM tasks WHERE task_id=?", (task_id,))
        return cursor.rowcount > 0

    # --- change notifications -----------------------------------------------------------
    def subscribe_task(self, task_id: str, listener: Listener) -> Callable[[], None]:
        def matching(change: TaskChange) -> None:
            if change.task_id == task_id:
                listener(change)

        return self._changes.subscribe(matching)

    def subscribe_work(self, environments: Iterable[str], listener: Listener) -> Callable[[], None]:
        wanted = frozenset(environments)

        def matching(change: TaskChange) -> None:
            if change.status == TaskStatus.PENDING.value and change.environment in wanted:
                listener(change)

        return self._changes.subscribe(matching)

    def may_have_work(self, environments: Iterable[str], now: dt.datetime) -> bool:
        envs = list(environments)
        marks = ",".join("?" * len(envs)) or "NULL"
        query = (
            "SELECT 1 FROM tasks WHERE status='PENDING' "  # noqa: S608  # only '?' marks are interpolated
            f"AND environment IN ({marks}) AND available_at <= ? LIMIT 1"
        )
        return self._connection().execute(query, (*envs, _ts(now))).fetchone() is not None

    def next_wake_at(self, environments: Iterable[str], now: dt.datetime) -> dt.datetime | None:
        envs = list(environments)
        marks = ",".join("?" * len(envs)) or "NULL"
        leased = tuple(status.value for status in LEASED_STATUSES)
        pending = f"status='PENDING' AND environment IN ({marks}) AND available_at > ?"
        query = (
            f"SELECT MIN(t) FROM (SELECT MIN(available_at) AS t FROM tasks WHERE {pending} "  # noqa: S608  # only '?' marks are interpolated
            "UNION ALL SELECT MIN(lease_expires_at) FROM tasks "
            "WHERE status IN (?, ?) AND lease_expires_at > ?)"
        )
        row = self._connection().execute(query, (*envs, _ts(now), *leased, _ts(now))).fetchone()
        return dt.datetime.fromtimestamp(row[0], dt.UTC) if row and row[0] is not None else None
