"""fetch_task: a pulling runner claims its next task (the seed's consumer endpoint).

Route: GET /api/comm/task/fetch?worker_id=W&environments=face_swap,comm&wait=20
Answers the seed's envelope ``{code, success, data, message}``; ``wait`` holds the
request open (long poll, at most 25 s) until a task arrives. Every parameter is
optional, as in the seed: a bare call claims for ``consumer:<key owner>@<address>``.
"""

from __future__ import annotations

import flask
import functions_framework

from shared.http import (
    RequestContext,
    Route,
    caller_gone,
    dispatch_request,
    health_response,
    json_response,
    query_float,
)


def fetch(ctx: RequestContext) -> flask.Response:
    ctx.principal.require_runner()
    asked = ctx.request.args.get("environments")
    environments = (
        [name.strip() for name in asked.split(",") if name.strip()] if asked else ctx.settings.environments
    )
    # The seed's consumers call the route bare: their lease is named after the caller.
    worker_id = (
        ctx.request.args.get("worker_id")
        or ctx.request.headers.get("X-Worker-Id")
        or f"consumer:{ctx.principal.owner}@{ctx.request.remote_addr or 'unknown'}"
    )
    task = ctx.service.fetch_for_runner(
        worker_id=worker_id,
        environments=environments,
        wait_s=query_float(ctx.request, "wait", 0.0),
        caller_gone=caller_gone(ctx.request),
    )
    if task is None:
        return json_response({"code": 204, "success": True, "data": None, "message": "No task available"})
    body = {"code": 200, "success": True, "message": "Task fetched successfully"}
    return json_response(body, encoded={"data": ctx.service.task_json(task)})


ROUTES = [
    Route("GET", "/api/comm/task/fetch", fetch, "fetch_task", client_route=False),
    Route("GET", "/api/health", health_response, "health", public=True),
]


@functions_framework.http
def fetch_task(request: flask.Request) -> flask.Response:
    return dispatch_request(request, ROUTES)
