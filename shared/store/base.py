"""The TaskStore interface and the task life cycle built on its two atomic primitives.

A backend implements storage and two atomic operations:

* ``update(task_id, mutate)``: read, apply ``mutate``, write back, all or nothing
  (SQLite ``BEGIN IMMEDIATE``; a Firestore transaction). ``mutate`` may raise to abort.
* ``claim_next(...)``: pick the best PENDING task for some environments and lease it, in
  one atomic step, so two runners never get the same task.

Everything else (claim one task, heartbeat, progress, complete, fail, retry, release,
cancel, reap expired leases) is written once here on top of ``update``, so both
backends follow the same rules (shared.tasks.apply_transition).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime as dt
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shared.errors import ComfySwapError, Conflict, NotFound
from shared.store.notify import ChangeWatch, Listener, TaskChange, WorkLine, WorkWatch
from shared.tasks import (
    LEASED_STATUSES,
    TERMINAL_STATUSES,
    Lease,
    Progress,
    QueueStats,
    Task,
    TaskError,
    TaskStatus,
    apply_transition,
    utcnow,
)

__all__ = ["TaskStore"]

Mutation = Callable[[Task], Task]

# Guards the lazy creation of a store's work lines (watch_work).
_WORK_LINES_LOCK = threading.Lock()

# How long a finished task is kept (TASK_RETENTION_DAYS); make_task_store passes the setting.
DEFAULT_RETENTION = dt.timedelta(days=30)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim_next request as the backends get it: environments distinct and never
    empty, ``now`` always set."""

    worker_id: str
    environments: tuple[str, ...]
    lease_seconds: float
    now: dt.datetime
    max_running_per_owner: int


class TaskStore(abc.ABC):
    """Where tasks live. Implementations: SQLiteTaskStore, FirestoreTaskStore."""

    retention: dt.timedelta = DEFAULT_RETENTION
    # True when subscribe_task/subscribe_work only register a callback in this process (no
    # network, no blocking): an event loop may then call them without a thread hop.
    subscribes_in_process: bool = False

    def expire_at(self, task: Task) -> dt.datetime | None:
        """When a finished task may be deleted (stored as ``expire_at``: Firestore's TTL
        policy deletes on it, the SQLite sweep queries it); None while it is not finished."""
        if not task.is_terminal or task.finished_at is None:
            return None
        return task.finished_at + self.retention

    # --- backend primitives ------------------------------------------------------------
    @abc.abstractmethod
    def create(self, task: Task, *, serialized: str | None = None) -> Task:
        """Store a new task. Raises Conflict(code=idempotency_key_reused) carrying the
        existing task in ``details['task_id']`` if (owner, idempotency_key) is taken.
        ``serialized`` is ``json.dumps(task.to_document())`` when the caller has it already
        (a backend that stores JSON text writes it as it is)."""

    @abc.abstractmethod
    def get(self, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    def update(self, task_id: str, mutate: Mutation) -> Task:
        """Atomically replace the task by ``mutate(task)``; NotFound if absent."""

    def claim_next(
        self,
        *,
        worker_id: str,
        environments: Iterable[str],
        lease_seconds: float,
        now: dt.datetime | None = None,
        max_running_per_owner: int = 0,
    ) -> Task | None:
        """Lease the next available PENDING task of ``environments``, fairly between owners.

        Tenants take turns: the owner with the fewest claimed (FETCHED or PROCESSING) tasks
        goes first, the oldest waiting head breaking ties; priority orders an owner's own
        tasks only, so one tenant's priority-10 burst cannot starve another's. An owner
        with ``max_running_per_owner`` (0 = no cap) claimed tasks gets no more until one ends.
        """
        envs = tuple(dict.fromkeys(environments))
        if not envs:
            return None
        return self._claim(Claim(worker_id, envs, lease_seconds, now or utcnow(), max_running_per_owner))

    @abc.abstractmethod
    def _claim(self, claim: Claim) -> Task | None:
        """claim_next for one backend, its request normalised (see Claim)."""

    @abc.abstractmethod
    def list_tasks(
        self, *, owner: str | None = None, statuses: Iterable[TaskStatus] | None = None, limit: int = 50
    ) -> list[Task]:
        """Newest first."""

    @abc.abstractmethod
    def queue_stats(self, *, owner: str | None = None) -> QueueStats: ...

    @abc.abstractmethod
    def find_by_idempotency_key(self, owner: str, key: str) -> Task | None: ...

    @abc.abstractmethod
    def expired_lease_ids(self, now: dt.datetime, limit: int = 100) -> list[str]:
        """Ids of FETCHED/PROCESSING tasks whose lease ended before ``now``."""

    @abc.abstractmethod
    def expired_task_ids(self, now: dt.datetime, limit: int = 100) -> list[str]:
        """Ids of finished tasks whose ``expire_at`` is at or before ``now``, oldest first."""

    @abc.abstractmethod
    def delete(self, task_id: str) -> bool:
        """Remove the task document (and its idempotency key); False if it was not there."""

    @abc.abstractmethod
    def pending_ids_available_before(self, cutoff: dt.datetime, limit: int = 100) -> list[str]:
        """Ids of PENDING tasks claimable since before ``cutoff``, longest-waiting first.

        The re-dispatch sweep's query: in push mode such a task's delivery failed or was
        lost, and oldest first means a backlog cannot starve the earliest tasks."""

    def creation_conflict(self, task: Task) -> Conflict:
        """The Conflict for a create that hit an existing row: the idempotency key's task
        (the caller replays it or refuses a different body), or a task id collision."""
        existing = (
            self.find_by_idempotency_key(task.owner, task.idempotency_key) if task.idempotency_key else None
        )
        if existing is not None:
            return Conflict(
                "idempotency key already used",
                code="idempotency_key_reused",
                details={"task_id": existing.taskId},
            )
        return Conflict(f"task {task.taskId} already exists", code="task_exists")

    def finished_since(self, cutoff: dt.datetime, *, limit: int = 2000) -> list[Task]:
        """Tasks that ended (COMPLETED, FAILED, CANCELLED) at or after ``cutoff``, at most
        ``limit`` of them: the admin console's last hour (shared.fleet).

        This default reads the newest ``limit`` finished tasks by creation and keeps those
        that ended in the window; a backend with an index on ``finished_at`` overrides it
        to read only the window."""
        finished = self.list_tasks(statuses=sorted(TERMINAL_STATUSES), limit=limit)
        return [task for task in finished if task.finished_at is not None and task.finished_at >= cutoff]

    # --- change notifications -----------------------------------------------------------
    # Waiters subscribe before they read, then block until a change or their deadline:
    # no loop re-reads the store to find out whether something happened. A backend
    # without notifications keeps these defaults and its waiters simply time out.
    def subscribe_task(self, task_id: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after every committed change of ``task_id``; returns the
        unsubscribe function."""
        return _nothing_to_unsubscribe

    def subscribe_work(self, environments: Iterable[str], listener: Listener) -> Callable[[], None]:
        """Call ``listener`` when a task of ``environments`` may have become claimable."""
        return _nothing_to_unsubscribe

    def may_have_work(self, environments: Iterable[str], now: dt.datetime) -> bool:
        """False only when no PENDING task of ``environments`` is claimable at ``now``: a
        claimer that just took a task then waits for a notification (or next_wake_at)
        instead of claiming again to find nothing. True (the default) when unsure."""
        return True

    def next_wake_at(self, environments: Iterable[str], now: dt.datetime) -> dt.datetime | None:
        """When a claimer waiting for work must look again although nobody wrote: the end
        of the earliest retry backoff (of ``environments``) or the earliest lease to expire
        (the reaper re-queues its task then). None: only a write can bring work."""
        return None

    @contextlib.contextmanager
    def watch_task(self, task_id: str, *, wake_on: Iterable[str] | None = None) -> Iterator[ChangeWatch]:
        """``wake_on``: the statuses whose changes wake the waiter (default: every change);
        a change to another status is only kept as ``watch.last``."""
        watch = ChangeWatch()
        listener: Listener = watch.notify
        if wake_on is not None:
            waking = frozenset(wake_on)

            def listener(change: TaskChange) -> None:
                if change.status in waking:
                    watch.notify(change)
                else:
                    watch.last = change  # read when the wait ends without a waking change

        unsubscribe = self.subscribe_task(task_id, listener)
        try:
            yield watch
        finally:
            unsubscribe()

    @contextlib.contextmanager
    def watch_work(self, environments: Iterable[str]) -> Iterator[WorkWatch]:
        """Wait in this process's line for work of ``environments``: a change wakes one
        waiter, not all (WorkLine). The waiter calls ``watch.tried(took)`` after each claim."""
        envs = tuple(dict.fromkeys(environments))
        with _WORK_LINES_LOCK:
            lines: dict[frozenset[str], WorkLine] = self.__dict__.setdefault("_work_lines", {})
            line = lines.get(frozenset(envs))
            if line is None:
                line = lines[frozenset(envs)] = WorkLine(
                    lambda listener: self.subscribe_work(list(envs), listener)
                )
        watch = line.join()
        try:
            yield watch
        finally:
            line.leave(watch)

    def wait_for_work(self, timeout_s: float, environments: Iterable[str] | None = None) -> bool:
        """Block until a task of ``environments`` (default: any) may have become claimable,
        or the timeout passes; True when woken by a change (the caller claims next)."""
        from shared.workflows import ENVIRONMENTS

        with self.watch_work(environments if environments is not None else ENVIRONMENTS) as watch:
            woke = watch.wait(timeout_s)
            watch.tried(took=woke)  # the caller acts on the wake: it is not passed on
            return woke

    def close(self) -> None:  # noqa: B027  # optional hook, most backends hold nothing to close
        """Release connections."""

    # --- the life cycle, once for every backend ---------------------------------------
    def get_or_raise(self, task_id: str) -> Task:
        task = self.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id} not found", code="task_not_found", details={"task_id": task_id})
        return task

    def claim(self, task_id: str, *, worker_id: str, lease_seconds: float) -> Task:
        """Lease one named task (push delivery). Conflict if it is not PENDING."""
        now = utcnow()
        return self.update(task_id, lambda task: claimed_by_name(task, worker_id, lease_seconds, now))

    def heartbeat(self, task_id: str, *, worker_id: str, lease_seconds: float) -> Task:
        """Extend the lease; Conflict(lease_lost) if another runner holds it now."""
        now = utcnow()

        def mutate(task: Task) -> Task:
            _check_holder(task, worker_id)
            updated = task.model_copy(deep=True)
            updated.lease = Lease(owner=worker_id, expires_at=now + dt.timedelta(seconds=lease_seconds))
            updated.updated_at = now
            return updated

        return self.update(task_id, mutate)

    def set_progress(
        self, task_id: str, *, worker_id: str, progress: Progress, lease_seconds: float | None = None
    ) -> Task:
        """Record progress; with ``lease_seconds`` the same write renews the lease."""
        now = utcnow()

        def mutate(task: Task) -> Task:
            _check_holder(task, worker_id)
            updated = task.model_copy(deep=True)
            updated.progress = progress
            updated.updated_at = now
            if lease_seconds is not None:
                updated.lease = Lease(owner=worker_id, expires_at=now + dt.timedelta(seconds=lease_seconds))
            return updated

        return self.update(task_id, mutate)

    def transition(
        self,
        task_id: str,
        to: TaskStatus,
        *,
        worker_id: str | None = None,
        changes: dict[str, Any] | None = None,
    ) -> Task:
        return self.update(
            task_id, lambda task: apply_transition(task, to, worker_id=worker_id, changes=changes)
        )

    def start_processing(
        self, task_id: str, *, worker_id: str, timings: dict[str, float] | None = None
    ) -> Task:
        def mutate(task: Task) -> Task:
            merged = {**task.timings, **(timings or {})}
            return apply_transition(
                task, TaskStatus.PROCESSING, worker_id=worker_id, changes={"timings": merged}
            )

        return self.update(task_id, mutate)

    def complete(
        self,
        task_id: str,
        *,
        worker_id: str,
        output_data: dict[str, Any],
        timings: dict[str, float] | None = None,
        started_at: dt.datetime | None = None,
    ) -> Task:
        """``started_at``: when the job went on the engine. A short job goes FETCHED ->
        COMPLETED without a PROCESSING write (gpu_runner/worker.py), and a finished task
        still says when it started."""

        def mutate(task: Task) -> Task:
            merged = {**task.timings, **(timings or {})}
            progress = Progress(value=1, max=1, stage="done")
            changes: dict[str, Any] = {
                "output_data": output_data,
                "timings": merged,
                "error": None,
                "progress": progress,
            }
            if task.started_at is None and started_at is not None:
                changes["started_at"] = started_at
            return apply_transition(task, TaskStatus.COMPLETED, worker_id=worker_id, changes=changes)

        return self.update(task_id, mutate)

    def fail_or_retry(
        self,
        task_id: str,
        *,
        worker_id: str | None,
        error: ComfySwapError,
        timings: dict[str, float] | None = None,
        retry_delay_s: float = 0.0,
    ) -> Task:
        """A retryable error with attempts left sends the task back to PENDING (after
        ``retry_delay_s``); anything else ends it FAILED. Either way the attempt is kept in
        ``attempt_history`` so nothing about it is lost."""
        now = utcnow()

        def mutate(task: Task) -> Task:
            merged = {**task.timings, **(timings or {})}
            history = [*task.attempt_history, _attempt_record(task, error, now)]
            task_error = TaskError(**error.to_dict())
            if error.retryable and task.attempts < task.max_attempts:
                changes = {
                    "error": task_error,
                    "timings": merged,
                    "attempt_history": history,
                    "available_at": now + dt.timedelta(seconds=retry_delay_s),
                    "progress": None,
                }
                return apply_transition(
                    task, TaskStatus.PENDING, worker_id=worker_id, now=now, changes=changes
                )
            if error.retryable:
                task_error = TaskError(
                    code=error.code,
                    message=f"{error.message} (gave up after {task.attempts} attempts)",
                    retryable=False,
                    details=error.details or None,
                )
            changes = {"error": task_error, "timings": merged, "attempt_history": history}
            return apply_transition(task, TaskStatus.FAILED, worker_id=worker_id, now=now, changes=changes)

        return self.update(task_id, mutate)

    def release(self, task_id: str, *, worker_id: str, reason: str) -> Task:
        """Give a leased task back (shutdown) without counting the attempt against it."""
        now = utcnow()

        def mutate(task: Task) -> Task:
            history = [
                *task.attempt_history,
                {"attempt": task.attempts, "released": reason, "at": now.isoformat()},
            ]
            changes = {
                "attempts": max(0, task.attempts - 1),
                "attempt_history": history,
                "available_at": now,
                "progress": None,  # the next runner starts from the beginning
            }
            return apply_transition(task, TaskStatus.PENDING, worker_id=worker_id, now=now, changes=changes)

        return self.update(task_id, mutate)

    def cancel(self, task_id: str) -> Task:
        def mutate(task: Task) -> Task:
            if task.is_terminal:
                raise Conflict(
                    f"task {task_id} is already {task.status}",
                    code="already_finished",
                    details={"task_id": task_id, "status": task.status.value},
                )
            error = TaskError(code="cancelled", message="cancelled by the client", retryable=False)
            return apply_transition(task, TaskStatus.CANCELLED, changes={"error": error})

        return self.update(task_id, mutate)

    def reap_expired_leases(self, now: dt.datetime | None = None) -> list[Task]:
        """Re-queue (or fail, after max attempts) tasks whose runner stopped renewing."""
        now = now or utcnow()
        reaped: list[Task] = []
        for task_id in self.expired_lease_ids(now):

            def mutate(task: Task) -> Task:
                if task.status not in LEASED_STATUSES or task.lease is None or task.lease.expires_at >= now:
                    raise Conflict("lease no longer expired", code="not_expired")
                error = ComfySwapError(
                    f"runner {task.lease.owner} stopped renewing its lease",
                    code="lease_expired",
                    retryable=True,
                )
                history = [*task.attempt_history, _attempt_record(task, error, now)]
                if task.attempts < task.max_attempts:
                    changes = {"attempt_history": history, "available_at": now, "progress": None}
                    return apply_transition(task, TaskStatus.PENDING, now=now, changes=changes)
                final = TaskError(
                    code="lease_expired",
                    message=f"no runner finished the task in {task.attempts} attempts; last runner "
                    f"{task.lease.owner} stopped renewing its lease",
                    retryable=False,
                )
                return apply_transition(
                    task, TaskStatus.FAILED, now=now, changes={"attempt_history": history, "error": final}
                )

            try:
                reaped.append(self.update(task_id, mutate))
            except (Conflict, NotFound):
                continue
        return reaped


def _nothing_to_unsubscribe() -> None:
    return None


def _leased(task: Task, worker_id: str, lease_seconds: float, now: dt.datetime) -> Task:
    updated = apply_transition(task, TaskStatus.FETCHED, now=now)
    updated.attempts = task.attempts + 1
    updated.lease = Lease(owner=worker_id, expires_at=now + dt.timedelta(seconds=lease_seconds))
    updated.error = None
    queue_wait = max(0.0, (now - task.available_at).total_seconds())
    updated.timings = {**task.timings, "queue_wait_s": round(queue_wait, 6)}
    return updated


def _check_holder(task: Task, worker_id: str) -> None:
    holder = task.lease.owner if task.lease else None
    if task.status not in LEASED_STATUSES or holder != worker_id:
        raise Conflict(
            f"task {task.taskId} is not leased to {worker_id!r} (status {task.status}, holder {holder!r})",
            code="lease_lost",
            details={"task_id": task.taskId, "lease_owner": holder, "status": task.status.value},
        )


def _attempt_record(task: Task, error: ComfySwapError, now: dt.datetime) -> dict[str, Any]:
    return {
        "attempt": task.attempts,
        "runner": task.lease.owner if task.lease else None,
        "code": error.code,
        "message": error.message,
        "retryable": error.retryable,
        "at": now.isoformat(),
    }


def claimed_by_name(task: Task, worker_id: str, lease_seconds: float, now: dt.datetime) -> Task:
    """The claimed form of a task a push delivery names (TaskStore.claim); Conflict if it is
    not PENDING or still in retry backoff."""
    if task.status != TaskStatus.PENDING:
        raise Conflict(
            f"task {task.taskId} is {task.status}, not PENDING",
            code="not_claimable",
            details={"task_id": task.taskId, "status": task.status.value},
        )
    if task.available_at > now:
        # In retry backoff: a push (a Cloud Tasks retry, a duplicate) must wait for it
        # exactly as a pulling runner's claim_next does.
        wait_s = (task.available_at - now).total_seconds()
        raise Conflict(
            f"task {task.taskId} is in retry backoff for another {wait_s:.1f}s",
            code="not_available_yet",
            details={"task_id": task.taskId, "retry_after_s": max(1, math.ceil(wait_s))},
        )
    return _leased(task, worker_id, lease_seconds, now)


def leased_copy(task: Task, worker_id: str, lease_seconds: float, now: dt.datetime) -> Task:
    """The claimed form of a PENDING task; backends call this inside claim_next."""
    return _leased(task, worker_id, lease_seconds, now)


RUNNING_STATUSES = (TaskStatus.FETCHED, TaskStatus.PROCESSING)


def fair_pick(candidates: list[Task], running: dict[str, int], max_running_per_owner: int = 0) -> list[Task]:
    """``candidates`` (best first within each owner) in the order tenants take turns:
    fewest running first, then the order given; owners at their cap left out."""
    ranked = [
        (running.get(task.owner, 0), index, task)
        for index, task in enumerate(candidates)
        if not max_running_per_owner or running.get(task.owner, 0) < max_running_per_owner
    ]
    return [task for _, _, task in sorted(ranked, key=lambda item: item[:2])]
