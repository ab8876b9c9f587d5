"""HTTP glue shared by the three functions: routing, JSON bodies, errors to responses.

One place maps :class:`shared.errors.ComfySwapError` to a status code and a body
``{"success": false, "error": {code, message, retryable, details}, "detail": message}``
(``detail`` is what the seed's FastAPI clients read).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import socket
from collections.abc import Callable
from typing import Any

import flask

from shared.auth import Principal, authenticate
from shared.errors import BadRequest, ComfySwapError, NotFound, RateLimited, ValidationFailed
from shared.logs import (
    bind_task,
    bind_trace,
    configure_logging,
    encode_json,
    get_logger,
    unbind_task,
    unbind_trace,
)
from shared.ratelimit import RateLimiter
from shared.request_guard import body_too_large, parse_json
from shared.service import TaskService
from shared.settings import Settings, get_settings

__all__ = ["Route", "caller_gone", "dispatch_request", "json_response", "rate_limiter", "service"]

logger = get_logger(__name__)

Handler = Callable[["RequestContext"], flask.Response]
ANONYMOUS = Principal(owner="", roles=frozenset())
_NO_STORE = {"Cache-Control": "no-store"}


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    name: str
    # Public routes (health, the OpenAPI document) answer without credentials; the rest
    # need a client key unless the handler asks for another role (runner, admin) itself.
    public: bool = False
    client_route: bool = True

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "/?$")


@dataclasses.dataclass
class RequestContext:
    request: flask.Request
    principal: Principal
    path_params: dict[str, str]
    service: TaskService
    settings: Settings

    def json_body(self) -> Any:
        """The parsed JSON body, within MAX_REQUEST_BYTES and MAX_JSON_DEPTH; 4xx for anything else."""
        limit = self.settings.max_request_bytes
        check_declared_length(self.request, limit)
        # Never more than one byte past the cap in memory, whatever the body's framing.
        raw = self.request.stream.read(limit + 1)
        if len(raw) > limit:
            raise body_too_large(limit)
        return parse_json(raw)


def check_declared_length(request: flask.Request, limit: int) -> None:
    """A declared body over the cap is refused before anything else looks at the request."""
    length = request.content_length
    if length is not None and length > limit:
        raise body_too_large(limit, length)


@functools.cache
def service() -> TaskService:
    """One service (store client, dispatcher) per process instance, created on first use."""
    settings = get_settings()
    configure_logging(settings.log_level)
    return TaskService.from_settings(settings)


@functools.lru_cache(maxsize=1)
def rate_limiter(svc: TaskService) -> RateLimiter:
    """The buckets of this instance, one set per service (a new service starts afresh)."""
    return RateLimiter.from_settings(svc.settings)


def json_response(
    body: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
    *,
    encoded: dict[str, str] | None = None,
) -> flask.Response:
    """``body`` as JSON; ``encoded`` adds members to that object whose values are JSON text
    already (a task the service serialised once), appended as they are, not parsed again."""
    text = encode_json(body)
    if encoded:
        members = [f"{json.dumps(name)}: {value}" for name, value in encoded.items()]
        text = text[:-1] + (", " if body else "") + ", ".join(members) + "}"
    all_headers = {"Cache-Control": "no-store", **headers} if headers else _NO_STORE
    return flask.Response(text, status=status, headers=all_headers, mimetype="application/json")


def error_response(error: ComfySwapError) -> flask.Response:
    headers = {}
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(error.retry_after_s)
    body = {"success": False, "error": error.to_dict(), "detail": error.message}
    return json_response(body, error.http_status, headers)


def dispatch_request(request: flask.Request, routes: list[Route]) -> flask.Response:
    """Find the route, authenticate, run the handler; every error becomes one clear response."""
    svc = service()
    trace_header = request.headers.get("X-Cloud-Trace-Context", "")
    trace_token = bind_trace(
        f"projects/{svc.settings.google_cloud_project}/traces/{trace_header.split('/')[0]}"
        if trace_header
        else None
    )
    try:
        check_declared_length(request, svc.settings.max_request_bytes)
        path = request.path
        allowed_methods = []
        for route in routes:
            match = route.regex.match(path)
            if not match:
                continue
            allowed_methods.append(route.method)
            if route.method != request.method:
                continue
            principal = ANONYMOUS if route.public else authenticate(request.headers, svc.settings)
            if not route.public and route.client_route:
                principal.require_client()
            if not route.public:
                rate_limiter(svc).check(principal)
            params = match.groupdict()
            task_token = bind_task(params.get("task_id"))
            try:
                return route.handler(RequestContext(request, principal, params, svc, svc.settings))
            finally:
                unbind_task(task_token)
        if allowed_methods:
            response = json_response(
                {
                    "success": False,
                    "error": {"code": "method_not_allowed", "message": f"use {allowed_methods}"},
                },
                405,
            )
            response.headers["Allow"] = ", ".join(sorted(set(allowed_methods)))
            return response
        raise NotFound(f"no route {request.method} {path}", code="route_not_found")
    except ComfySwapError as exc:
        if exc.http_status >= 500:
            logger.warning(
                "request failed", extra={"code": exc.code, "error": exc.message, "path": request.path}
            )
        return error_response(exc)
    except Exception:
        logger.exception("unhandled error", extra={"path": request.path})
        return error_response(ComfySwapError("internal error; the request changed nothing it did not report"))
    finally:
        unbind_trace(trace_token)


def query_int(request: flask.Request, name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationFailed(name, "must be an integer") from None


def query_float(request: flask.Request, name: str, default: float) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValidationFailed(name, "must be a number") from None
    if value != value or value < 0:  # NaN or negative
        raise BadRequest(f"{name} must be a non-negative number", code="validation_failed")
    return value


def health_response(ctx: RequestContext) -> flask.Response:
    from shared.tasks import utcnow

    return json_response({"status": "healthy", "timestamp": utcnow().isoformat()})


def status_response(ctx: RequestContext) -> flask.Response:
    return json_response(ctx.service.status(ctx.principal))


def caller_gone(request: flask.Request) -> Callable[[], bool]:
    """Whether the caller of a long poll has hung up: its connection is closed (gunicorn,
    the local server, hands the client's socket in the WSGI environ; a peek that reads
    end-of-file says so). Where the connection cannot be seen (Cloud Functions, behind
    Google's front end) never: the lease then bounds what a claim for nobody costs."""
    client: socket.socket | None = request.environ.get("gunicorn.socket")
    if client is None:
        return lambda: False

    def gone() -> bool:
        try:
            return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # open, nothing sent: still waiting for our answer
            return False
        except OSError:  # reset or closed under us
            return True

    return gone
