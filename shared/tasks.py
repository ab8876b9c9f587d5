"""The task: the seed's unified format, its statuses and the transitions between them.

A task is one document (Firestore) or row (SQLite). Every status change goes through
:func:`apply_transition`, which both stores call inside their compare-and-set, so the
rules live in one place: terminal states never change, and a worker may only move a
task it holds the lease on.
"""

from __future__ import annotations

import datetime as dt
import enum
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.errors import Conflict

__all__ = [
    "ALLOWED_TRANSITIONS",
    "TERMINAL_STATUSES",
    "Lease",
    "Progress",
    "QueueStats",
    "Task",
    "TaskError",
    "TaskStatus",
    "apply_transition",
    "new_task_id",
    "utcnow",
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_task_id() -> str:
    """``task_`` + 128 random bits: never sequential, never guessable."""
    return "task_" + secrets.token_hex(16)


class TaskStatus(enum.StrEnum):
    PENDING = "PENDING"
    FETCHED = "FETCHED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

# FETCHED: claimed by a runner (lease held), inputs downloading. PROCESSING: on an engine.
# Back to PENDING: released (shutdown), retried after a transient error, or lease expired.
ALLOWED_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.FETCHED, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.FETCHED: frozenset(
        {
            TaskStatus.PROCESSING,
            TaskStatus.PENDING,
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.CANCELLED,
        }
    ),
    TaskStatus.PROCESSING: frozenset(
        {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.PENDING, TaskStatus.CANCELLED}
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}

# Statuses in which a runner holds a lease.
LEASED_STATUSES = frozenset({TaskStatus.FETCHED, TaskStatus.PROCESSING})


class Lease(BaseModel):
    owner: str
    expires_at: dt.datetime


class Progress(BaseModel):
    value: float = 0
    max: float = 1
    stage: str = ""


class TaskError(BaseModel):
    code: str
    message: str
    retryable: bool = False
    details: dict[str, Any] | None = None


class TaskParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_data: dict[str, Any] = Field(default_factory=dict)


class Task(BaseModel):
    """One task in the unified format (DESIGN.md §2). Unknown fields are kept, not dropped."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    taskId: str = Field(default_factory=new_task_id)  # noqa: N815  # seed field name
    workflow: str
    workflow_name: str = ""
    environment: str
    target_port: int | None = None
    params: TaskParams = Field(default_factory=TaskParams)
    status: TaskStatus = TaskStatus.PENDING
    priority: int = Field(5, ge=0, le=10)
    attempts: int = 0
    max_attempts: int = 3
    # Bumped every time the task goes back to PENDING (released, reaped, retried) or is
    # dispatched again by the sweep: each delivery gets its own Cloud Tasks name, which
    # `attempts` cannot give (a release decrements it, so names would repeat).
    dispatch_generation: int = 0
    # When the re-dispatch sweep last enqueued it again (None: only at creation or a requeue).
    redispatched_at: dt.datetime | None = None
    lease: Lease | None = None
    progress: Progress | None = None
    output_data: dict[str, Any] | None = None
    error: TaskError | None = None
    owner: str = ""
    webhook_url: str | None = None
    # Outcome of the completion webhook: {status, attempts, last_status_code, at}.
    webhook_delivery: dict[str, Any] | None = None
    idempotency_key: str | None = None
    # sha256 of the create request, to tell an Idempotency-Key replay from a reuse.
    request_fingerprint: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    attempt_history: list[dict[str, Any]] = Field(default_factory=list)
    created_at: dt.datetime = Field(default_factory=utcnow)
    # When a PENDING task may next be claimed: its creation, or a retry's backoff time.
    available_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None

    def model_post_init(self, context: Any, /) -> None:
        if not self.workflow_name:
            self.workflow_name = self.workflow

    @property
    def task_id(self) -> str:
        return self.taskId

    @property
    def input_data(self) -> dict[str, Any]:
        return self.params.input_data

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_document(self) -> dict[str, Any]:
        """The stored and served form: JSON-safe, timestamps as ISO-8601 UTC."""
        return self.model_dump(mode="json")

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Task:
        return cls.model_validate(document)


class QueueStats(BaseModel):
    pending: int = 0
    fetched: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    oldest_pending_age_s: float | None = None

    @property
    def queue_length(self) -> int:
        return self.pending


def apply_transition(
    task: Task,
    to: TaskStatus,
    *,
    worker_id: str | None = None,
    now: dt.datetime | None = None,
    changes: dict[str, Any] | None = None,
) -> Task:
    """Return ``task`` moved to ``to``, or raise :class:`Conflict` if the move is not allowed.

    ``worker_id`` is the fencing token: a runner whose lease was taken over (it stalled,
    the reaper re-queued its task) cannot complete or fail a task it no longer holds.
    """
    now = now or utcnow()
    if to not in ALLOWED_TRANSITIONS[task.status]:
        raise Conflict(
            f"task {task.taskId} is {task.status}, it cannot become {to}",
            code="invalid_transition",
            details={"task_id": task.taskId, "status": task.status.value, "requested": to.value},
        )
    if worker_id is not None:
        # Whatever the state: a runner writes only while it holds the lease. A task that
        # was reaped (PENDING) or finished has no holder, so an old holder is refused too.
        holder = task.lease.owner if task.lease and task.status in LEASED_STATUSES else None
        if holder != worker_id:
            raise Conflict(
                f"task {task.taskId} is not leased to {worker_id!r} "
                f"(status {task.status}, holder {holder!r})",
                code="lease_lost",
                details={"task_id": task.taskId, "lease_owner": holder, "status": task.status.value},
            )
    updated = task.model_copy(deep=True, update=dict(changes or {}))
    updated.status = to
    updated.updated_at = now
    if to == TaskStatus.PROCESSING and updated.started_at is None:
        updated.started_at = now
    if to in TERMINAL_STATUSES or to == TaskStatus.PENDING:
        updated.lease = None
    if to == TaskStatus.PENDING:
        updated.dispatch_generation = task.dispatch_generation + 1
    if to in TERMINAL_STATUSES:
        updated.finished_at = now
    return updated


# Fields of input_data (and of its template_params) that point at a client's input media.
INPUT_MEDIA_FIELDS = ("source_url", "target_url", "image_url")
WITHHELD = "[withheld: inputs are only shown to their owner while the task runs]"


def without_input_media(document: dict[str, Any]) -> dict[str, Any]:
    """A task document whose input URLs are withheld (face photos are personal data: lists,
    webhooks and finished tasks never send them back). ``input:`` references to the input
    store carry only a digest and a size, and stay."""
    params = document.get("params") or {}
    input_data = dict(params.get("input_data") or {})

    def scrub(values: dict[str, Any]) -> dict[str, Any]:
        return {
            key: (WITHHELD if key in INPUT_MEDIA_FIELDS and not str(value).startswith("input:") else value)
            for key, value in values.items()
        }

    input_data = scrub(input_data)
    if isinstance(input_data.get("template_params"), dict):
        input_data["template_params"] = scrub(input_data["template_params"])
    if isinstance(input_data.get("image_inputs"), list):
        input_data["image_inputs"] = [
            {**entry, "url": WITHHELD} if not str(entry.get("url", "")).startswith("input:") else entry
            for entry in input_data["image_inputs"]
            if isinstance(entry, dict)
        ]
    return {**document, "params": {**params, "input_data": input_data}}
