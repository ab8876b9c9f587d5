"""get_task: one task, the task list with queue statistics, and health.

Routes: GET /api/tasks/{task_id} (``?wait=N``: hold up to N s, at most 25, until the task
ends), GET /api/tasks/ (admin sees all; a client its own),
GET /api/face-swap/queue-status, GET /api/face-swap/workflows, GET /api/health, GET /api/status,
POST /internal/reap, GET /api/admin/stats (admin: the fleet's numbers),
GET /console (the web console's files).
"""

from __future__ import annotations

import flask
import functions_framework

from shared.http import (
    RequestContext,
    Route,
    dispatch_request,
    health_response,
    json_response,
    query_float,
    query_int,
    status_response,
)
from shared.logs import get_logger, log_event

logger = get_logger(__name__)

# PENDING this long with no runner claiming it: its push was lost, enqueue it again.
STALE_PENDING_S = 300.0


def one_task(ctx: RequestContext) -> flask.Response:
    task = ctx.service.get_task(
        ctx.path_params["task_id"], principal=ctx.principal, wait_s=query_float(ctx.request, "wait", 0.0)
    )
    # A finished task's inputs are gone (face data lives only for the job): not even their URLs.
    # task_view's shape, the task written as JSON by pydantic (not to_document + json.dumps).
    task_json = ctx.service.task_json(task, with_inputs=not task.is_terminal)
    return json_response(ctx.service.task_view_members(task), encoded={"task": task_json})


def all_tasks(ctx: RequestContext) -> flask.Response:
    body = ctx.service.list_tasks(
        principal=ctx.principal,
        status=ctx.request.args.get("status"),
        limit=query_int(ctx.request, "limit", 50),
    )
    return json_response(body)


def queue_status(ctx: RequestContext) -> flask.Response:
    return json_response(ctx.service.queue_status(principal=ctx.principal))


def openapi(ctx: RequestContext) -> flask.Response:
    from shared.openapi import openapi_document

    return json_response(openapi_document())


def admin_stats(ctx: RequestContext) -> flask.Response:
    from shared.fleet import fleet_stats

    ctx.principal.require_admin()
    return json_response(fleet_stats(ctx.service.store))


def face_swap_workflows(ctx: RequestContext) -> flask.Response:
    """Static template data and this deployment's engine: answered here, so reading it
    never wakes a GPU runner."""
    from shared.workflows import workflows_document

    return json_response(workflows_document(ctx.settings.face_swap_engine))


def console_file(ctx: RequestContext) -> flask.Response:
    """The console's static files: public (they hold no secret); the API calls they make
    carry the person's API key."""
    from shared.console import ASSETS, CONTENT_SECURITY_POLICY, read_asset
    from shared.errors import NotFound

    name = ctx.path_params.get("asset", "index.html")
    if name not in ASSETS:
        raise NotFound(f"no console file {name}", code="route_not_found")
    response = flask.Response(read_asset(name), status=200, content_type=ASSETS[name])
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def reap(ctx: RequestContext) -> flask.Response:
    """Called every minute by Cloud Scheduler: re-queue tasks whose runner stopped renewing
    its lease, enqueue again PENDING tasks whose delivery was lost, log queue numbers.

    Deployed, the caller is Cloud Scheduler's OIDC token, checked by authorize_reaper
    (REAPER_INVOKER_EMAIL); locally, an admin API key."""
    from shared.oidc import authorize_reaper

    authorize_reaper(ctx.request.headers, ctx.settings)
    reaped = ctx.service.reap_expired_leases()
    sweep = ctx.service.redispatch_stale_pending(STALE_PENDING_S)
    stats = ctx.service.store.queue_stats()
    log_event(logger, "queue_stats", queue_length=stats.queue_length, **stats.model_dump())
    return json_response(
        {"reaped": len(reaped), "redispatch": sweep.as_dict(), "queue_length": stats.queue_length}
    )


ROUTES = [
    Route("GET", "/api/tasks", all_tasks, "list_tasks"),
    Route("GET", "/api/tasks/{task_id}", one_task, "get_task"),
    Route("GET", "/api/face-swap/queue-status", queue_status, "queue_status"),
    Route("GET", "/api/face-swap/workflows", face_swap_workflows, "face_swap_workflows", public=True),
    Route("GET", "/api/health", health_response, "health", public=True),
    Route("GET", "/api/status", status_response, "status"),
    # No API key check before the handler: the schedule sends an OIDC token, not a key.
    Route("POST", "/internal/reap", reap, "reap", public=True),
    Route("GET", "/api/openapi.json", openapi, "openapi", public=True),
    Route("GET", "/api/admin/stats", admin_stats, "admin_stats"),
    Route("GET", "/console", console_file, "console", public=True),
    Route("GET", "/console/{asset}", console_file, "console_asset", public=True),
]


@functions_framework.http
def get_task(request: flask.Request) -> flask.Response:
    return dispatch_request(request, ROUTES)
