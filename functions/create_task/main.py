"""create_task: validate a new task, store it, dispatch it (and cancel one).

Routes: POST /api/tasks/create, POST /api/face-swap/create-task,
POST /api/tasks/{task_id}/cancel, DELETE /api/tasks/{task_id}, GET /api/health, GET /api/status.
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
    status_response,
)


def _created(ctx: RequestContext, *, face_swap_shortcut: bool) -> flask.Response:
    result = ctx.service.create_task(
        ctx.json_body(),
        principal=ctx.principal,
        idempotency_key=ctx.request.headers.get("Idempotency-Key"),
        face_swap_shortcut=face_swap_shortcut,
    )
    task = result.task
    body: dict[str, object] = {
        "success": True,
        "taskId": task.taskId,
        "task_id": task.taskId,
        "status": task.status.value,
        "message": "Task created successfully"
        if result.created
        else "Task already created with this Idempotency-Key",
    }
    headers = {"Location": f"/api/tasks/{task.taskId}"}
    if not result.created:
        headers["Idempotent-Replayed"] = "true"
    if result.task_json is None:  # a replay: the stored task, read back
        body["task"] = ctx.service.task_view(task)["task"]
        return json_response(body, 200, headers)
    # A new task: the JSON the service made for the store, not a second serialisation.
    return json_response(body, 200, headers, encoded={"task": result.task_json})


def create(ctx: RequestContext) -> flask.Response:
    return _created(ctx, face_swap_shortcut=False)


def create_face_swap(ctx: RequestContext) -> flask.Response:
    return _created(ctx, face_swap_shortcut=True)


def cancel(ctx: RequestContext) -> flask.Response:
    task = ctx.service.cancel_task(ctx.path_params["task_id"], principal=ctx.principal)
    return json_response(
        {
            "success": True,
            "status": task.status.value,
            "task": ctx.service.task_view(task, with_inputs=False)["task"],
        }
    )


def delete(ctx: RequestContext) -> flask.Response:
    task_id = ctx.path_params["task_id"]
    removed = ctx.service.delete_task(task_id, principal=ctx.principal)
    return json_response({"success": True, "deleted": task_id, "objects_removed": removed})


ROUTES = [
    Route("POST", "/api/tasks/create", create, "create_task"),
    Route("POST", "/api/face-swap/create-task", create_face_swap, "create_face_swap_task"),
    Route("POST", "/api/tasks/{task_id}/cancel", cancel, "cancel_task"),
    Route("DELETE", "/api/tasks/{task_id}", delete, "delete_task"),
    Route("GET", "/api/health", health_response, "health", public=True),
    Route("GET", "/api/status", status_response, "status"),
]


@functions_framework.http
def create_task(request: flask.Request) -> flask.Response:
    return dispatch_request(request, ROUTES)
