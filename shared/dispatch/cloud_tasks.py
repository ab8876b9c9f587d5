"""Push dispatch: one Cloud Task per delivery, an HTTP POST of the task id to the runner.

The Cloud Task carries only the id (Cloud Tasks caps a task at 100 KB; the data lives
in the task store) and, when an invoker service account is configured, an OIDC token the
runner verifies (shared.oidc). Its name is derived from the task id and the task's
``dispatch_generation``, so a repeated dispatch of the same delivery is de-duplicated by
Cloud Tasks (ALREADY_EXISTS, which counts as success here), while a task released,
reaped, retried or swept gets a fresh name: Cloud Tasks refuses a name for about an hour
after its task ran, which would otherwise swallow the re-delivery. (Not ``attempts``: a
release gives the attempt back, so attempt numbers repeat.)

Past one queue (Cloud Tasks dispatches at most 500 tasks/s per queue), the dispatcher is
given several queues of the same region and sends each task to the one :func:`queue_index`
picks from a hash of the task's environment and id: stable, so every re-dispatch of a task
lands in the queue that already holds its earlier names, and uniform, so each queue takes
about 1/N of the rate.

Transient gRPC failures are retried by the client under a ``google.api_core.retry.Retry``
(exponential backoff with jitter, within one deadline for the whole enqueue, as the GCS
provider does); a final failure raises UpstreamUnavailable (``dispatch_failed``). The caller
keeps the task PENDING, and :func:`shared.dispatch.redispatch_stale_pending` enqueues it
again later.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.cloud import tasks_v2

from shared.dispatch.base import Dispatcher
from shared.errors import UpstreamUnavailable
from shared.logs import get_logger, log_event
from shared.tasks import Task

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "RUNNER_PUSH_PATH",
    "CloudTasksDispatcher",
    "cloud_task_id",
    "make_cloud_tasks_client",
    "queue_ids",
    "queue_index",
]

logger = get_logger(__name__)

# The runner's push endpoint (gpu_runner/app.py serves it).
RUNNER_PUSH_PATH = "/internal/tasks/run"

# Worth another try: the service or the network hiccuped, or we were throttled.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
    gexc.Aborted,
    gexc.Unknown,
)


def cloud_task_id(task: Task) -> str:
    """The Cloud Task's id for this delivery of ``task``.

    A short hash comes first because Cloud Tasks spreads load by name prefix and every
    task id starts with ``task_``; the dispatch generation makes each delivery a new name.
    """
    spread = hashlib.sha256(task.taskId.encode()).hexdigest()[:8]
    return f"{spread}-{task.taskId}-{task.dispatch_generation}"


def queue_index(task: Task, queues: int) -> int:
    """Which of ``queues`` queues carries ``task``: a hash of its environment and id.

    sha256, not Python's ``hash`` (salted per process): the functions, the reaper and the
    runner must all pick the same queue for a task.
    """
    if queues < 1:
        raise ValueError("at least one queue is needed")
    digest = hashlib.sha256(f"{task.environment}/{task.taskId}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % queues


def queue_ids(settings: Settings) -> list[str]:
    """CLOUD_TASKS_QUEUES in order (the order is part of the hash's contract), else CLOUD_TASKS_QUEUE."""
    listed = [name.strip() for name in settings.cloud_tasks_queues.split(",") if name.strip()]
    return listed or [settings.cloud_tasks_queue]


def make_cloud_tasks_client(settings: Settings) -> tasks_v2.CloudTasksClient:
    """The client, on an insecure channel to CLOUD_TASKS_EMULATOR_HOST when one is set
    (TLS with anonymous credentials fails the emulator's handshake)."""
    if settings.cloud_tasks_emulator_host:
        import grpc  # type: ignore[import-untyped]  # grpcio ships no type hints
        from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

        channel = grpc.insecure_channel(settings.cloud_tasks_emulator_host)
        return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    return tasks_v2.CloudTasksClient()


class CloudTasksDispatcher(Dispatcher):
    """Enqueue each task as an HTTP Cloud Task targeting the runner's push endpoint."""

    def __init__(
        self,
        client: Any,
        *,
        queue_path: str | Sequence[str],
        target_url: str,
        invoker_email: str = "",
        audience: str = "",
        dispatch_deadline_s: int = 1800,
        retry_deadline_s: float = 10.0,
        backoff_s: float = 0.5,
        backoff_max_s: float = 4.0,
    ) -> None:
        """``retry_deadline_s`` bounds one enqueue, its retries included: past it the task
        stays PENDING for the re-dispatch sweep rather than hold the caller's request."""
        self._client = client
        self.queue_paths = [queue_path] if isinstance(queue_path, str) else list(queue_path)
        if not self.queue_paths:
            raise ValueError("at least one queue path is needed")
        # The first queue: what a single-queue deployment and its logs call "the queue".
        self.queue_path = self.queue_paths[0]
        self.target_url = target_url
        self.invoker_email = invoker_email
        self.audience = audience or target_url
        self.dispatch_deadline_s = dispatch_deadline_s
        self.retry_deadline_s = retry_deadline_s
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s

    @classmethod
    def from_settings(cls, settings: Settings) -> CloudTasksDispatcher:
        client = make_cloud_tasks_client(settings)
        return cls(
            client,
            queue_path=[
                client.queue_path(settings.google_cloud_project, settings.cloud_tasks_location, queue)
                for queue in queue_ids(settings)
            ],
            target_url=settings.effective_runner_url + RUNNER_PUSH_PATH,
            invoker_email=settings.cloud_tasks_invoker_email,
            audience=settings.runner_oidc_audience or settings.effective_runner_url,
            dispatch_deadline_s=settings.cloud_tasks_dispatch_deadline_s,
        )

    def queue_path_for(self, task: Task) -> str:
        """The queue this task's deliveries go to (one of ``queue_paths``, by :func:`queue_index`)."""
        return self.queue_paths[queue_index(task, len(self.queue_paths))]

    def build_cloud_task(self, task: Task) -> tasks_v2.Task:
        """The typed Cloud Task for one delivery of ``task``: ids only, never its data."""
        http_request = tasks_v2.HttpRequest(
            url=self.target_url,
            http_method=tasks_v2.HttpMethod.POST,
            headers={"Content-Type": "application/json"},
            body=json.dumps({"task_id": task.taskId}).encode(),
        )
        if self.invoker_email:
            http_request.oidc_token = tasks_v2.OidcToken(
                service_account_email=self.invoker_email, audience=self.audience
            )
        cloud_task = tasks_v2.Task(
            name=f"{self.queue_path_for(task)}/tasks/{cloud_task_id(task)}",
            http_request=http_request,
            dispatch_deadline=dt.timedelta(seconds=self.dispatch_deadline_s),
        )
        if task.available_at > dt.datetime.now(dt.UTC):
            # A retry in backoff: delivered when it may be claimed, not hammered before.
            cloud_task.schedule_time = task.available_at
        return cloud_task

    def dispatch(self, task: Task) -> None:
        cloud_task = self.build_cloud_task(task)
        transient: list[Exception] = []
        retry = Retry(
            predicate=if_exception_type(*_TRANSIENT_ERRORS),
            initial=self._backoff_s,
            maximum=self._backoff_max_s,
            multiplier=2.0,
            timeout=self.retry_deadline_s,
            on_error=transient.append,
        )
        try:
            # The client runs each attempt with the time left of ``timeout`` and retries
            # transient errors under ``retry`` until that same deadline.
            self._client.create_task(
                parent=self.queue_path_for(task), task=cloud_task, retry=retry, timeout=self.retry_deadline_s
            )
        except gexc.AlreadyExists:
            log_event(logger, "dispatch_duplicate", task_id=task.taskId, cloud_task=cloud_task.name)
            return
        except gexc.RetryError as exc:  # still failing when the deadline came
            raise self._failure(task, exc.cause or exc, len(transient)) from exc
        except gexc.GoogleAPICallError as exc:
            # Permission, a missing queue, a bad request: retrying cannot help.
            raise self._failure(task, exc, len(transient) + 1) from exc
        log_event(
            logger,
            "task_dispatched",
            task_id=task.taskId,
            cloud_task=cloud_task.name,
            attempt=len(transient) + 1,
        )

    def _failure(self, task: Task, exc: Exception, attempts: int) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"could not enqueue task {task.taskId} on Cloud Tasks after {attempts} attempt(s): {exc}",
            code="dispatch_failed",
            details={
                "task_id": task.taskId,
                "queue": self.queue_path_for(task),
                "error": type(exc).__name__,
                "attempts": attempts,
            },
        )
