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

Past one region, the dispatcher is given runner pools (RUNNER_POOLS, shared/pools.py): each a
region's runner with its own queues, target URL and OIDC audience and identity. A task tries
the pools in :func:`shared.pools.pool_order` (those serving its environment, first the one a
weighted hash of its id picks); when a pool's enqueue fails after its retries (the region is
unreachable, the queue is missing or paused, permission is refused) the next pool gets the
same delivery. The Cloud Task keeps its name in every queue, and Cloud Tasks de-duplicates a
name only within one queue: if a "failed" enqueue had in fact been stored (a deadline that
passed after the server wrote it), the task is delivered once per pool. That is the duplicate
delivery every push already tolerates: the runner claims the task (PENDING -> FETCHED, a
compare-and-set) before it runs anything, and the second claim finds it taken and is
dropped. Only when every pool fails does dispatch fail, and the task stays PENDING for the
re-dispatch sweep: nothing is lost. A region can also fail without refusing anything (its
queue takes the task, its runners never claim it): each new delivery of a task (a new
dispatch generation: the sweep's, a retry's, a release's) starts one pool further down the
order, so the sweep moves such a task to the next region.

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
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.cloud import tasks_v2

from shared.dispatch.base import Dispatcher
from shared.errors import UpstreamUnavailable
from shared.logs import get_logger, log_event
from shared.pools import RunnerPool, pool_order
from shared.tasks import Task

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "RUNNER_PUSH_PATH",
    "CloudTasksDispatcher",
    "PoolRoute",
    "cloud_task_id",
    "make_cloud_tasks_client",
    "pools_from_settings",
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


def pools_from_settings(settings: Settings) -> list[RunnerPool]:
    """RUNNER_POOLS, else the one pool the single-region settings describe."""
    if settings.runner_pools:
        return list(settings.runner_pools)
    return [
        RunnerPool.model_construct(
            name="default",
            location=settings.cloud_tasks_location,
            queues=tuple(queue_ids(settings)),
            runner_url=settings.effective_runner_url,
            audience=settings.runner_oidc_audience,
            invoker_email=settings.cloud_tasks_invoker_email,
            weight=1.0,
            environments=(),
        )
    ]


@dataclass(frozen=True)
class PoolRoute:
    """Where one pool's deliveries go: its queues (full paths, in hash order), the push
    target and the OIDC token's identity and audience."""

    pool: RunnerPool
    queue_paths: tuple[str, ...]
    target_url: str
    invoker_email: str
    audience: str

    @property
    def name(self) -> str:
        return self.pool.name

    def queue_path_for(self, task: Task) -> str:
        return self.queue_paths[queue_index(task, len(self.queue_paths))]


class _PoolFailed(Exception):
    def __init__(self, route: PoolRoute, cause: Exception, attempts: int) -> None:
        super().__init__(str(cause))
        self.route, self.cause, self.attempts = route, cause, attempts


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
    """Enqueue each task as an HTTP Cloud Task targeting a runner's push endpoint, in the
    first runner pool that takes it."""

    def __init__(
        self,
        client: Any,
        *,
        queue_path: str | Sequence[str] = (),
        target_url: str = "",
        invoker_email: str = "",
        audience: str = "",
        routes: Sequence[PoolRoute] = (),
        dispatch_deadline_s: int = 1800,
        retry_deadline_s: float = 10.0,
        backoff_s: float = 0.5,
        backoff_max_s: float = 4.0,
    ) -> None:
        """Either ``routes`` (runner pools) or one pool's ``queue_path`` (one path or several of
        one region) and ``target_url``. ``retry_deadline_s`` bounds one dispatch, its retries
        and its fallbacks included (each pool tried gets an equal share): past it the task
        stays PENDING for the re-dispatch sweep rather than hold the caller's request."""
        self._client = client
        if not routes:
            paths = (queue_path,) if isinstance(queue_path, str) else tuple(queue_path)
            if not paths:
                raise ValueError("at least one queue path is needed")
            location = paths[0].split("/locations/", 1)[-1].split("/", 1)[0]
            pool = RunnerPool.model_construct(
                name="default",
                location=location,
                queues=tuple(path.rsplit("/", 1)[-1] for path in paths),
                runner_url=target_url,
                audience=audience,
                invoker_email=invoker_email,
                weight=1.0,
                environments=(),
            )
            routes = (PoolRoute(pool, paths, target_url, invoker_email, audience or target_url),)
        self.routes = tuple(routes)
        self._route_by_name = {route.name: route for route in self.routes}
        self._pools = [route.pool for route in self.routes]
        self.queue_paths = [path for route in self.routes for path in route.queue_paths]
        # The first pool's: what a single-pool deployment and its logs call "the queue".
        first = self.routes[0]
        self.queue_path = first.queue_paths[0]
        self.target_url = first.target_url
        self.invoker_email = first.invoker_email
        self.audience = first.audience
        self.dispatch_deadline_s = dispatch_deadline_s
        self.retry_deadline_s = retry_deadline_s
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s

    @classmethod
    def from_settings(cls, settings: Settings) -> CloudTasksDispatcher:
        client = make_cloud_tasks_client(settings)
        project = settings.google_cloud_project
        routes = [
            PoolRoute(
                pool,
                tuple(client.queue_path(project, pool.location, queue) for queue in pool.queues),
                target_url=pool.runner_url.rstrip("/") + RUNNER_PUSH_PATH,
                invoker_email=pool.invoker_email,
                audience=pool.effective_audience,
            )
            for pool in pools_from_settings(settings)
        ]
        return cls(client, routes=routes, dispatch_deadline_s=settings.cloud_tasks_dispatch_deadline_s)

    def routes_for(self, task: Task) -> list[PoolRoute]:
        """The pools to try for ``task``, first choice first: shared.pools.pool_order,
        started one pool further down for each new delivery of the task (its dispatch
        generation: a retry, a release, a reaped lease, the sweep's re-dispatch of a task
        still PENDING). A region whose queue takes tasks but whose runners never claim
        them holds a task until the sweep, and the sweep's delivery goes elsewhere."""
        order = [
            self._route_by_name[pool.name] for pool in pool_order(self._pools, task.taskId, task.environment)
        ]
        if not order:
            return order
        start = task.dispatch_generation % len(order)
        return order[start:] + order[:start]

    def serves(self, task: Task) -> bool:
        return bool(self.routes_for(task))

    def queue_path_for(self, task: Task) -> str:
        """The queue of the task's first-choice pool (by :func:`queue_index` within it)."""
        routes = self.routes_for(task)
        return (routes[0] if routes else self.routes[0]).queue_path_for(task)

    def build_cloud_task(self, task: Task, route: PoolRoute | None = None) -> tasks_v2.Task:
        """The typed Cloud Task for one delivery of ``task`` through ``route`` (default: its
        first-choice pool): ids only, never its data."""
        if route is None:
            routes = self.routes_for(task)
            route = routes[0] if routes else self.routes[0]
        http_request = tasks_v2.HttpRequest(
            url=route.target_url,
            http_method=tasks_v2.HttpMethod.POST,
            headers={"Content-Type": "application/json"},
            body=json.dumps({"task_id": task.taskId}).encode(),
        )
        if route.invoker_email:
            http_request.oidc_token = tasks_v2.OidcToken(
                service_account_email=route.invoker_email, audience=route.audience
            )
        cloud_task = tasks_v2.Task(
            name=f"{route.queue_path_for(task)}/tasks/{cloud_task_id(task)}",
            http_request=http_request,
            dispatch_deadline=dt.timedelta(seconds=self.dispatch_deadline_s),
        )
        if task.available_at > dt.datetime.now(dt.UTC):
            # A retry in backoff: delivered when it may be claimed, not hammered before.
            cloud_task.schedule_time = task.available_at
        return cloud_task

    def dispatch(self, task: Task) -> None:
        routes = self.routes_for(task)
        if not routes:
            raise UpstreamUnavailable(
                f"no runner pool serves environment {task.environment!r} (RUNNER_POOLS environments)",
                code="no_runner_pool",
                retryable=False,
                details={"task_id": task.taskId, "environment": task.environment},
            )
        # Each pool gets an equal share of the deadline: a region that is down must not use
        # up the time the next region needs.
        share_s = self.retry_deadline_s / len(routes)
        failures: list[_PoolFailed] = []
        for route in routes:
            try:
                self._enqueue(task, route, share_s, failed_over=[failure.route.name for failure in failures])
                return
            except _PoolFailed as failure:
                failures.append(failure)
                if len(failures) < len(routes):
                    log_event(
                        logger,
                        "dispatch_pool_failed",
                        level=logging.WARNING,
                        task_id=task.taskId,
                        error=f"{type(failure.cause).__name__}: {failure.cause}",
                        pool=route.name,
                        queue=route.queue_path_for(task),
                        attempts=failure.attempts,
                    )
        raise self._failure(task, failures)

    def _enqueue(self, task: Task, route: PoolRoute, deadline_s: float, *, failed_over: list[str]) -> None:
        cloud_task = self.build_cloud_task(task, route)
        transient: list[Exception] = []
        retry = Retry(
            predicate=if_exception_type(*_TRANSIENT_ERRORS),
            initial=self._backoff_s,
            maximum=self._backoff_max_s,
            multiplier=2.0,
            timeout=deadline_s,
            on_error=transient.append,
        )
        try:
            # The client runs each attempt with the time left of ``timeout`` and retries
            # transient errors under ``retry`` until that same deadline.
            self._client.create_task(
                parent=route.queue_path_for(task), task=cloud_task, retry=retry, timeout=deadline_s
            )
        except gexc.AlreadyExists:
            log_event(logger, "dispatch_duplicate", task_id=task.taskId, cloud_task=cloud_task.name)
            return
        except gexc.RetryError as exc:  # still failing when the deadline came
            raise _PoolFailed(route, exc.cause or exc, len(transient)) from exc
        except gexc.GoogleAPICallError as exc:
            # Permission, a missing or paused queue, a bad request: retrying this queue
            # cannot help; another region's may.
            raise _PoolFailed(route, exc, len(transient) + 1) from exc
        log_event(
            logger,
            "task_dispatched",
            task_id=task.taskId,
            cloud_task=cloud_task.name,
            pool=route.name,
            attempt=len(transient) + 1,
            failed_over_from=",".join(failed_over),
        )

    def _failure(self, task: Task, failures: list[_PoolFailed]) -> UpstreamUnavailable:
        first = failures[0]
        attempts = sum(failure.attempts for failure in failures)
        tried = ", ".join(f"{failure.route.name}: {failure.cause}" for failure in failures)
        return UpstreamUnavailable(
            f"could not enqueue task {task.taskId} on Cloud Tasks after {attempts} attempt(s) "
            f"in {len(failures)} pool(s): {tried}",
            code="dispatch_failed",
            details={
                "task_id": task.taskId,
                "queue": first.route.queue_path_for(task),
                "error": type(first.cause).__name__,
                "attempts": attempts,
                "pools": [
                    {
                        "pool": failure.route.name,
                        "queue": failure.route.queue_path_for(task),
                        "error": type(failure.cause).__name__,
                        "attempts": failure.attempts,
                    }
                    for failure in failures
                ],
            },
        )
