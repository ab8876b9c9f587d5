"""What the three functions do, without HTTP: create, read, list, claim and cancel tasks.

``functions/*/main.py`` parse the request, call one method here and render the result;
the local dev server mounts the same functions, so the embedded and cloud paths share
every line below.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.auth import Principal
from shared.dispatch import Dispatcher, RedispatchReport, make_dispatcher, redispatch_stale_pending
from shared.dispatch.base import record_dispatch_failure
from shared.errors import (
    ComfySwapError,
    Conflict,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
    validation_failed_from,
)
from shared.logs import get_logger, log_event, log_failure, log_task_claimed
from shared.ratelimit import WaitSlots
from shared.settings import Settings
from shared.store import TaskStore, make_task_store
from shared.tasks import TERMINAL_STATUSES, Task, TaskStatus, utcnow, without_input_media

if TYPE_CHECKING:
    from shared.inputs import InputStore

__all__ = ["CreateTaskRequest", "TaskService"]

logger = get_logger(__name__)

# Longest a runner's fetch may hold the request open waiting for work.
MAX_FETCH_WAIT_S = 25.0
_TERMINAL_VALUES = frozenset(status.value for status in TERMINAL_STATUSES)
# Longest GET /api/tasks/{task_id}?wait= may hold the request waiting for the task to end.
MAX_TASK_WAIT_S = 25.0
# Largest task document (its JSON), inputs excluded: under Firestore's 1 MiB per document
# with room for its field-name and index overhead.
MAX_TASK_DOCUMENT_BYTES = 900_000
# What task_view withholds from every answer.
_WITHHELD_FROM_VIEW = {"request_fingerprint"}


class CreateTaskRequest(BaseModel):
    """Body of POST /api/tasks/create (the seed's shape, plus optional additions)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, defer_build=True)

    workflow: str | None = Field(None, min_length=1, max_length=128)
    workflow_name: str | None = Field(None, min_length=1, max_length=128)
    environment: str | None = Field("auto", max_length=64)
    task_data: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(5, ge=0, le=10)
    webhook_url: str | None = Field(None, max_length=2048)

    @property
    def workflow_id(self) -> str:
        return self.workflow or self.workflow_name or "default"


@dataclasses.dataclass
class CreateResult:
    task: Task
    created: bool  # False when an Idempotency-Key replay returned the original task
    # The answer's form of a new task (its JSON, request_fingerprint withheld as task_view
    # does), from the one serialisation that also made the stored row; None for a replay.
    task_json: str | None = None


def _request_fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class TaskService:
    def __init__(self, settings: Settings, store: TaskStore, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher
        self.wait_slots = WaitSlots(settings.max_waits_per_tenant)

    @classmethod
    def from_settings(cls, settings: Settings) -> TaskService:
        return cls(settings, make_task_store(settings), make_dispatcher(settings))

    # --- create -----------------------------------------------------------------------
    def parse_create(self, body: Any, *, face_swap_shortcut: bool = False) -> CreateTaskRequest:
        if not isinstance(body, dict):
            raise ValidationFailed("body", "must be a JSON object")
        if face_swap_shortcut:
            # POST /api/face-swap/create-task takes the face-swap fields at the top level.
            extras = {key: body[key] for key in ("priority", "webhook_url") if key in body}
            task_data = {key: value for key, value in body.items() if key not in extras}
            body = {"workflow": "face_swap", "environment": "face_swap", "task_data": task_data, **extras}
        try:
            return CreateTaskRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_failed_from(exc) from None

    def build_task(self, request: CreateTaskRequest, principal: Principal) -> Task:
        # Imported here: get_task and fetch_task never build a task (a shorter cold start).
        # As modules: ``from module import name`` in a function costs every call about three
        # times as much (the import system looks for the module's __path__ and builds, then
        # drops, the AttributeError), some 8,000 instructions per statement (issue 15).
        import shared.url_safety as url_safety
        import shared.workflows as workflows

        workflow = request.workflow_id
        if workflow == workflows.RAW_WORKFLOW or "wf_json" in request.task_data:
            environment = workflows.resolve_environment(workflows.RAW_WORKFLOW, request.environment)
        else:
            if workflow not in workflows.TEMPLATES:
                known = ", ".join([*workflows.TEMPLATES, workflows.RAW_WORKFLOW])
                raise ValidationFailed("workflow", f"unknown workflow {workflow!r}; known: {known}")
            environment = workflows.resolve_environment(workflow, request.environment)
        # A model the deployment's engine cannot run is a 400 now, not a failed job later.
        input_data = workflows.build_input_data(
            workflow,
            request.task_data,
            allow_raw=principal.may_send_raw_workflows,
            face_swap_engine=self.settings.face_swap_engine,
        )

        def check(url: str, field: str) -> None:
            try:
                url_safety.check_input_url(
                    url,
                    field=field,
                    allow_loopback=self.settings.fetch_allow_loopback,
                    max_bytes=self.settings.fetch_max_bytes,
                )
            except ValidationFailed as exc:
                if exc.code != "input_too_large":
                    raise
                # Too big is a 413 on every path (SQLite and Firestore alike), naming the field.
                raise PayloadTooLarge(
                    f"{field}: {exc.reason}",
                    code="input_too_large",
                    details={"field": field, "limit_bytes": self.settings.fetch_max_bytes},
                ) from None

        for field in ("source_url", "target_url"):
            if field in input_data:
                check(input_data[field], f"task_data.{field}")
        for image_input in input_data.get("image_inputs", []):
            check(image_input["url"], f"task_data.{image_input['param']}")
        if request.webhook_url:
            if not request.webhook_url.startswith(("http://", "https://")):
                raise ValidationFailed("webhook_url", "must be an http(s) URL")
            check(request.webhook_url, "webhook_url")
        return Task(
            workflow=workflow,
            workflow_name=workflow,
            environment=environment.name,
            target_port=environment.target_port,
            params={"input_data": input_data},
            priority=request.priority,
            max_attempts=self.settings.max_attempts,
            owner=principal.owner,
            webhook_url=request.webhook_url,
        )

    def create_task(
        self,
        body: Any,
        *,
        principal: Principal,
        idempotency_key: str | None = None,
        face_swap_shortcut: bool = False,
    ) -> CreateResult:
        """Validate, store, dispatch. A bad request raises before anything is written."""
        request = self.parse_create(body, face_swap_shortcut=face_swap_shortcut)
        task = self.build_task(request, principal)
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255:
                raise ValidationFailed("Idempotency-Key", "must be 1 to 255 characters")
            task.idempotency_key = idempotency_key
            task.request_fingerprint = _request_fingerprint(request.model_dump(mode="json"))
            existing = self.store.find_by_idempotency_key(principal.owner, idempotency_key)
            if existing is not None:
                return self._replay(existing, task)
        stored_inputs = self._store_data_inputs(task)
        try:
            # Serialised once: the size check's JSON is the row the store writes, and (less
            # the fingerprint) the answer's task.
            task_json, serialized = self._check_document_size(task)
            self.store.create(task, serialized=serialized)
        except Conflict as exc:
            self._drop_inputs(task, stored_inputs)
            if exc.code != "idempotency_key_reused":
                raise
            existing = self.store.get(exc.details["task_id"])
            if existing is None:
                raise
            return self._replay(existing, task)
        except BaseException:
            self._drop_inputs(task, stored_inputs)
            raise
        log_event(
            logger,
            "task_created",
            task_id=task.taskId,
            workflow=task.workflow,
            environment=task.environment,
            owner=task.owner,
        )
        self.dispatch_task(task)
        return CreateResult(task, created=True, task_json=task_json)

    @functools.cached_property
    def input_store(self) -> InputStore:
        from shared.inputs import make_input_store

        return make_input_store(self.settings)

    def _store_data_inputs(self, task: Task) -> bool:
        """Move every ``data:`` input of ``task`` to the input store (shared.inputs) and put
        its reference, with digest and size, everywhere the task held the payload."""
        import shared.url_safety as url_safety  # as a module: see build_task

        input_data = task.params.input_data
        fields = [(field, input_data.get(field)) for field in ("source_url", "target_url")]
        fields += [(item["param"], item["url"]) for item in input_data.get("image_inputs", [])]
        mapping: dict[str, str] = {}
        for field, value in fields:
            if not isinstance(value, str) or not url_safety.is_data_url(value) or value in mapping:
                continue
            media_type, payload = url_safety.data_url_payload(
                value, field=f"task_data.{field}", max_bytes=self.settings.fetch_max_bytes
            )
            mapping[value] = self.input_store.put(task.taskId, field, payload, media_type).url
        if mapping:
            from shared.inputs import replace_strings

            task.params.input_data = replace_strings(input_data, mapping)
            log_event(logger, "inputs_stored", task_id=task.taskId, count=len(mapping))
        return bool(mapping)

    def drop_inputs_of_finished(self, task: Task) -> None:
        """A task that ended keeps no input (the reaper's FAILED, a cancel)."""
        from shared.inputs import drop_task_inputs, input_refs

        if task.is_terminal and input_refs(task.params.input_data):
            drop_task_inputs(self.input_store, task)

    def _drop_inputs(self, task: Task, stored: bool) -> None:
        if stored:
            from shared.inputs import drop_task_inputs

            drop_task_inputs(self.input_store, task)

    @staticmethod
    def _check_document_size(task: Task) -> tuple[str, str]:
        """The same ceiling on every backend: Firestore refuses a document over 1 MiB, so
        SQLite refuses it too, and both answer 413 rather than 500. Returns the task's JSON
        as answered (``task_view``'s document: without request_fingerprint) and as stored
        (that plus the fingerprint), whose UTF-8 size is what the ceiling means.

        One serialisation, by pydantic's own serializer straight to JSON (the same text as
        ``json.dumps(task.to_document())``, without building the document's dict first: a
        third of create_task's serialising CPU, issue 15); the stored row appends the one
        withheld field to that object's text."""
        task_json = TaskService.task_json(task)
        fingerprint = json.dumps(task.request_fingerprint)
        serialized = f'{task_json[:-1]},"request_fingerprint":{fingerprint}}}'
        size = len(serialized) if serialized.isascii() else len(serialized.encode())
        if size > MAX_TASK_DOCUMENT_BYTES:
            raise PayloadTooLarge(
                f"the task would be {size} bytes, over the {MAX_TASK_DOCUMENT_BYTES}-byte limit of a "
                "task document (send inputs as data: URLs or links, not inside a workflow)",
                code="task_too_large",
                details={"field": "task_data", "size_bytes": size, "limit_bytes": MAX_TASK_DOCUMENT_BYTES},
            )
        return task_json, serialized

    def _replay(self, existing: Task, attempted: Task) -> CreateResult:
        if existing.request_fingerprint != attempted.request_fingerprint:
            raise Conflict(
                "this Idempotency-Key was used with a different request body",
                code="idempotency_key_reused",
                details={"task_id": existing.taskId},
            )
        return CreateResult(existing, created=False)

    def dispatch_task(self, task: Task) -> None:
        try:
            self.dispatcher.dispatch(task)
        except ComfySwapError as exc:
            # The task is stored and PENDING; the re-dispatch sweep enqueues it again, and
            # the task's error says so (or it ends FAILED when no dispatch can succeed).
            # The client still gets its task id: nothing is lost.
            log_failure(logger, "dispatch_failed", exc, task_id=task.taskId, level=logging.ERROR)
            recorded = record_dispatch_failure(self.store, task.taskId, exc)
            if recorded is not None and recorded.is_terminal:
                self._ended_here(recorded)

    def redispatch_stale_pending(
        self, older_than_s: float, *, new_generation: bool = True
    ) -> RedispatchReport:
        """The re-dispatch sweep (shared.dispatch.redispatch_stale_pending); a task it ends
        FAILED (no runner pool serves it) is followed up as a failed dispatch at create is."""
        report = redispatch_stale_pending(
            self.store, self.dispatcher, older_than_s, new_generation=new_generation
        )
        for task in report.ended:
            self._ended_here(task)
        return report

    def reap_expired_leases(self) -> list[Task]:
        """Tasks whose runner stopped renewing its lease go back to PENDING and are
        dispatched again at once (a new Cloud Tasks name: a new dispatch generation), or end
        FAILED after their last attempt, and then keep no input."""
        reaped = self.store.reap_expired_leases()
        for task in reaped:
            log_event(logger, "lease_reaped", task_id=task.taskId, status=task.status.value)
            if task.status == TaskStatus.PENDING:
                self.dispatch_task(task)
            else:
                self.drop_inputs_of_finished(task)
        return reaped

    # --- read -------------------------------------------------------------------------
    def get_task(self, task_id: str, *, principal: Principal, wait_s: float = 0.0) -> Task:
        """The task; with ``wait_s`` (at most MAX_TASK_WAIT_S), held until it is terminal or
        the wait ends (a long poll: the client learns of the end without a polling loop)."""
        if not 0 <= wait_s <= MAX_TASK_WAIT_S:  # also refuses NaN
            raise ValidationFailed("wait", f"must be between 0 and {MAX_TASK_WAIT_S:g} seconds")
        if wait_s <= 0:
            return self._visible_task(task_id, principal)
        deadline = time.monotonic() + wait_s
        # Subscribed before the first read: a change landing between the read and the wait
        # still wakes the wait. Only its end wakes it (a runner's claim or progress does
        # not: the answer would be the same wait again), never a timer.
        waiting = self.store.watch_task(task_id, wake_on=_TERMINAL_VALUES)
        with self.wait_slots.hold(principal.owner), waiting as watch:
            task = self._visible_task(task_id, principal)
            while not task.is_terminal and (remaining := deadline - time.monotonic()) > 0:
                if not watch.wait(remaining):
                    continue
                change = watch.last  # woken: the task ended
                if change is not None and change.task is not None:
                    task = change.task  # delivered with the change: no read
                else:
                    task = self._visible_task(task_id, principal)
            last = watch.last
            if not task.is_terminal and last is not None:  # the wait ended: answer the latest state
                task = last.task if last.task is not None else self._visible_task(task_id, principal)
        return task

    def _visible_task(self, task_id: str, principal: Principal) -> Task:
        task = self.store.get(task_id)
        # Another tenant's task is "not found", not "forbidden": ids leak nothing.
        if task is None or not principal.can_see(task.owner):
            raise NotFound(f"task {task_id} not found", code="task_not_found", details={"task_id": task_id})
        return task

    @staticmethod
    def task_json(task: Task, *, with_inputs: bool = True) -> str:
        """``task_view(task, with_inputs=...)["task"]`` as JSON text, written by pydantic's
        serializer straight from the model: the same JSON for a third of the CPU of
        ``to_document`` + ``json.dumps`` (issue 15). Without inputs, only ``params`` goes
        through the dict that ``without_input_media`` scrubs."""
        if with_inputs:
            return task.model_dump_json(exclude=_WITHHELD_FROM_VIEW)
        rest = task.model_dump_json(exclude={*_WITHHELD_FROM_VIEW, "params"})
        params = without_input_media({"params": task.params.model_dump(mode="json")})["params"]
        return f'{rest[:-1]},"params":{json.dumps(params)}}}'

    @staticmethod
    def task_view_members(task: Task) -> dict[str, Any]:
        """``task_view(task)`` less its ``task`` member, which ``task_json`` writes."""
        done = task.model_dump(mode="json", include={"output_data", "error"})
        return {
            "status": task.status.value,
            "result": done["output_data"] if task.status == TaskStatus.COMPLETED else None,
            "error": done["error"],
        }

    @staticmethod
    def task_view(task: Task, *, with_inputs: bool = True) -> dict[str, Any]:
        """The seed's ``{task, status, result}`` shape; ``with_inputs=False`` withholds the
        input URLs (lists, finished tasks: see ``shared.tasks.without_input_media``)."""
        document = task.to_document()
        for field in _WITHHELD_FROM_VIEW:
            document.pop(field, None)
        if not with_inputs:
            document = without_input_media(document)
        return {
            "task": document,
            "status": task.status.value,
            "result": document["output_data"] if task.status == TaskStatus.COMPLETED else None,
            "error": document["error"],
        }

    def list_tasks(
        self, *, principal: Principal, status: str | None = None, limit: int = 50
    ) -> dict[str, Any]:
        statuses = None
        if status:
            try:
                statuses = [TaskStatus(value.strip().upper()) for value in status.split(",")]
            except ValueError:
                raise ValidationFailed(
                    "status", f"unknown status; one of {[s.value for s in TaskStatus]}"
                ) from None
        if not 1 <= limit <= 500:
            raise ValidationFailed("limit", "must be between 1 and 500")
        owner = None if principal.is_admin else principal.owner
        tasks = self.store.list_tasks(owner=owner, statuses=statuses, limit=limit)
        stats = self.store.queue_stats(owner=owner)
        return {
            "tasks": [self.task_view(task, with_inputs=False)["task"] for task in tasks],
            "queue_length": stats.queue_length,
            "stats": stats.model_dump(),
        }

    def queue_status(self, *, principal: Principal) -> dict[str, Any]:
        stats = self.store.queue_stats(owner=None if principal.is_admin else principal.owner)
        return {"queue_length": stats.queue_length, **stats.model_dump()}

    # --- runner pull ------------------------------------------------------------------
    def fetch_for_runner(
        self,
        *,
        worker_id: str,
        environments: list[str],
        wait_s: float,
        caller_gone: Callable[[], bool] = lambda: False,
    ) -> Task | None:
        """Claim the next task, holding the request up to ``wait_s`` for one to arrive
        (a long poll: a pulling runner learns of new work at once, without a sleep loop).

        ``caller_gone`` is asked before every claim: a runner that hung up (it is shutting
        down) gets nothing claimed in its name, which would stay leased to nobody."""
        from shared.workflows import ENVIRONMENTS

        unknown = [name for name in environments if name not in ENVIRONMENTS]
        if unknown:
            raise ValidationFailed("environments", f"unknown environment(s) {unknown}")
        if not worker_id or len(worker_id) > 128:
            raise ValidationFailed("worker_id", "required, at most 128 characters")
        deadline = time.monotonic() + max(0.0, min(wait_s, MAX_FETCH_WAIT_S))
        # Subscribed before the first claim, so work published in between is not missed;
        # the wait ends on a new claimable task, at the end of a retry backoff or a lease
        # (the only changes nobody publishes), or at the deadline.
        with self.store.watch_work(environments) as watch:
            while True:
                if caller_gone():
                    log_event(logger, "fetch_abandoned", worker_id=worker_id)
                    return None
                task = claim_for_runner(
                    self.store, self.settings, worker_id=worker_id, environments=environments
                )
                watch.tried(took=task is not None)
                if task is not None:
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                now = utcnow()
                wake_at = self.store.next_wake_at(environments, now)
                if wake_at is not None:
                    remaining = min(remaining, max(0.0, (wake_at - now).total_seconds()) + 0.001)
                watch.wait(remaining)

    # --- cancel -----------------------------------------------------------------------
    def cancel_task(self, task_id: str, *, principal: Principal) -> Task:
        """PENDING ends at once; a running task ends CANCELLED here and its runner, which
        loses the lease, interrupts the engine at its next check."""
        self.get_task(task_id, principal=principal)
        task = self.store.cancel(task_id)
        log_event(logger, "task_finished", task_id=task_id, outcome="CANCELLED", code="cancelled")
        self._ended_here(task)
        return task

    # --- delete -----------------------------------------------------------------------
    def delete_task(self, task_id: str, *, principal: Principal) -> int:
        """Remove a task everywhere: cancel it if it has not ended (its runner stops at the
        next lease check), then its results on every provider that can list, its stored
        inputs and its document. Another tenant's id is "not found", like every read.
        Returns how many stored objects went."""
        from shared.storage import make_storage_chain
        from shared.storage.orphans import purge_task

        task = self._visible_task(task_id, principal)
        if not task.is_terminal:
            self.cancel_task(task_id, principal=principal)
        removed = purge_task(make_storage_chain(self.settings), self.store, self.input_store, task_id)
        log_event(logger, "task_deleted", task_id=task_id, objects=removed)
        return removed

    def _ended_here(self, task: Task) -> None:
        """A task this service ended (a cancel, a dispatch that can never succeed): its
        inputs go, and its webhook is told."""
        self.drop_inputs_of_finished(task)
        if task.webhook_url:
            self._notify_in_background(task)

    def _notify_in_background(self, task: Task) -> None:
        """The webhook goes out after the answer, never inside it: a receiver that never
        answers must not hold the cancel (nor a server thread) for its retries."""
        import asyncio
        import threading

        from shared.webhooks import WebhookNotifier

        notifier = WebhookNotifier(self.settings, self.store)
        threading.Thread(
            target=lambda: asyncio.run(notifier.notify(task)),
            name=f"webhook-{task.taskId}",
            daemon=True,
        ).start()

    # --- health -----------------------------------------------------------------------
    def status(self, principal: Principal) -> dict[str, Any]:
        """API health; the queue counts are the caller's own (an admin's: every tenant's)."""
        started = time.perf_counter()
        try:
            stats = self.store.queue_stats(owner=None if principal.is_admin else principal.owner)
            store_status: dict[str, Any] = {
                "status": "healthy",
                "backend": self.settings.task_store,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            }
        except Exception as exc:
            error = str(exc) if principal.is_admin else type(exc).__name__
            return {"api": "degraded", "store": {"status": "error", "error": error}, "queue_length": None}
        return {
            "api": "healthy",
            "store": store_status,
            "dispatch_mode": self.settings.dispatch_mode,
            "queue_length": stats.queue_length,
            "queue": stats.model_dump(),
        }


def claim_for_runner(
    store: TaskStore, settings: Settings, *, worker_id: str, environments: list[str]
) -> Task | None:
    """One claim of a pulling runner, through fetch_task or straight from a store on the
    same machine: tasks whose lease ran out go back first, then the next task with
    tenants taking turns (MAX_RUNNING_PER_TENANT)."""
    store.reap_expired_leases()
    task = store.claim_next(
        worker_id=worker_id,
        environments=environments,
        lease_seconds=settings.lease_seconds,
        max_running_per_owner=settings.max_running_per_tenant,
    )
    if task is not None:
        log_task_claimed(logger, task, worker_id=worker_id)
    return task
