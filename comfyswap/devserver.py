"""The local API: the three functions on one port, as the cloud gateway serves them.

Each function is loaded by functions-framework from its own folder (exactly as Cloud
Functions loads it), and requests are routed by the function's own route table (its
``ROUTES``); runner routes (``gpu_runner.app.ROUTES``: the direct swap, ComfyUI queue,
results under ``/results/``) are forwarded to the runner, so a client needs one host.
There is no route list here: a route added to a function or to the runner is served.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import sys
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import flask
import httpx
from functions_framework import create_app
from werkzeug.utils import send_file

from shared.errors import ComfySwapError, ValidationFailed
from shared.request_guard import body_too_large, normalise_path
from shared.settings import Settings
from shared.storage.local import RESULT_HEADERS, LocalStorage

__all__ = ["FUNCTION_NAMES", "RouteTable", "build_app", "guard_requests", "route_table", "serve"]

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_DIR = ROOT / "functions"
# In the order a path served by several functions is looked up (health, status: get_task).
FUNCTION_NAMES = ("get_task", "create_task", "fetch_task")

RESULTS_PREFIX = "/results/"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


@dataclasses.dataclass(frozen=True)
class RouteTable:
    """Who serves a request: ``(method, path regex, function name)`` from each function's
    ROUTES, and the runner's routes as ``(methods, path regex)``."""

    functions: Sequence[tuple[str, re.Pattern[str], str]]
    runner: Sequence[tuple[frozenset[str], re.Pattern[str]]]

    def owner(self, method: str, path: str) -> str | None:
        """A function name, ``"runner"`` or None. The functions come first (the runner's own
        /api/health and /api/status are not the public ones); a path a function knows under
        another method goes to that function, which answers 405."""
        for route_method, regex, name in self.functions:
            if route_method == method and regex.match(path):
                return name
        if any(regex.match(path) for _, regex in self.runner):
            return "runner"
        return next((name for _, regex, name in self.functions if regex.match(path)), None)


def _load_function(name: str) -> tuple[flask.Flask, list[Any]]:
    """The function's app, loaded as Cloud Functions loads it, and its route table."""
    app: flask.Flask = create_app(target=name, source=str(FUNCTIONS_DIR / name / "main.py"))  # type: ignore[no-untyped-call]  # functions-framework is untyped
    # functions-framework registers the source as sys.modules["main"] while it loads it.
    routes: list[Any] = sys.modules["main"].ROUTES
    return app, routes


def route_table(function_routes: dict[str, list[Any]]) -> RouteTable:
    from gpu_runner.app import ROUTES as RUNNER_ROUTES

    functions = [
        (route.method, route.regex, name) for name, routes in function_routes.items() for route in routes
    ]
    # /internal/ routes (the push endpoint) are for Cloud Tasks, never on the public host.
    runner = [
        (frozenset(route.methods or ()), route.path_regex)
        for route in RUNNER_ROUTES
        if not route.path.startswith("/internal/")
    ]
    return RouteTable(functions=functions, runner=runner)


def build_app(settings: Settings) -> flask.Flask:
    """A Flask app that sends each request to the function (or runner) that owns it."""
    loaded = {name: _load_function(name) for name in FUNCTION_NAMES}
    functions = {name: app for name, (app, _) in loaded.items()}
    table = route_table({name: routes for name, (_, routes) in loaded.items()})
    runner = httpx.Client(base_url=settings.effective_runner_url, timeout=httpx.Timeout(30.0, read=None))
    app = flask.Flask("comfyswap-devserver")

    def forward_to_runner(request: flask.Request) -> flask.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
        try:
            upstream = runner.send(
                runner.build_request(
                    request.method,
                    request.full_path if request.query_string else request.path,
                    headers=headers,
                    content=request.get_data(),
                ),
                stream=True,
            )
        except httpx.HTTPError as exc:
            error_body = {
                "success": False,
                "error": {
                    "code": "runner_unavailable",
                    "message": f"runner not reachable: {exc}",
                    "retryable": True,
                },
            }
            return flask.Response(flask.json.dumps(error_body), 503, mimetype="application/json")

        def stream_body() -> Iterable[bytes]:
            try:
                yield from upstream.iter_raw(64 * 1024)
            finally:
                upstream.close()

        response_headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP]
        return flask.Response(stream_body(), status=upstream.status_code, headers=response_headers)

    app.add_url_rule(
        "/<path:path>",
        "runner",
        lambda path: forward_to_runner(flask.request),
        methods=["GET", "POST", "DELETE", "PUT", "HEAD"],
    )

    def not_found(path: str) -> flask.Response:
        body = {"success": False, "error": {"code": "route_not_found", "message": f"no route {path}"}}
        return flask.Response(flask.json.dumps(body), 404, mimetype="application/json")

    fallback = flask.Flask("comfyswap-not-found")
    fallback.add_url_rule("/", "nf", lambda: not_found("/"), methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
    fallback.add_url_rule("/<path:path>", "nf2", not_found, methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
    forwarder = app.wsgi_app
    local_results = LocalStorage.from_settings(settings)

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "")
        if method in ("GET", "HEAD") and path.startswith(RESULTS_PREFIX):
            # A signed `local` result on this disk (one machine, one DATA_DIR) is sent from
            # here: no hop through the runner. Anything else (unsigned, expired, a runner on
            # another machine) is the runner's to answer.
            query = parse_qs(environ.get("QUERY_STRING", ""))
            found = local_results.signed_file(
                path.removeprefix(RESULTS_PREFIX),
                next(iter(query.get("expires", [])), None),
                next(iter(query.get("signature", [])), None),
            )
            if found is not None:
                response = send_file(found, environ, conditional=True)
                response.headers.update(RESULT_HEADERS)
                return response(environ, start_response)
        owner = table.owner(method, path)
        if owner == "runner":
            return forwarder(environ, start_response)
        target = functions[owner].wsgi_app if owner else fallback.wsgi_app
        return target(environ, start_response)

    app.wsgi_app = guard_requests(wsgi, max_body_bytes=settings.max_request_bytes)  # type: ignore[method-assign]
    return app


def guard_requests(wsgi_app: Any, *, max_body_bytes: int) -> Any:
    """Before routing and authentication: route on the normalised path
    (``shared.request_guard``), and cap the body at MAX_REQUEST_BYTES before it is read
    (a declared length at once; a chunked body is read up to the cap, never further)."""

    def guarded(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            environ["PATH_INFO"] = normalise_path(environ.get("PATH_INFO", ""))
            _cap_body(environ, max_body_bytes)
        except ComfySwapError as exc:
            body = json.dumps({"success": False, "error": exc.to_dict(), "detail": exc.message}).encode()
            status = f"{exc.http_status} {HTTPStatus(exc.http_status).phrase}"
            # The rest of an over-long body is never read: the connection cannot be reused.
            start_response(
                status,
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ],
            )
            return [body]
        return wsgi_app(environ, start_response)  # type: ignore[no-any-return]

    return guarded


def _cap_body(environ: dict[str, Any], limit: int) -> None:
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared:
        if not declared.isdigit():
            raise ValidationFailed("Content-Length", "must be a whole number of bytes")
        if int(declared) > limit:
            raise body_too_large(limit, int(declared))
        return
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return
    # Chunked: read at most one byte past the cap, then hand the function a sized body.
    stream = environ["wsgi.input"]
    body = stream.read(limit + 1)
    if len(body) > limit:
        raise body_too_large(limit)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))


def serve(settings: Settings, *, threads: int = 64) -> None:
    """Serve with gunicorn's threaded worker, as functions-framework does in production."""
    from functions_framework._http.gunicorn import GunicornApplication

    app = build_app(settings)
    # Threads, not processes: long-polling runners each hold one thread while they wait.
    GunicornApplication(  # type: ignore[no-untyped-call]  # functions-framework is untyped
        app,
        settings.api_host,
        settings.api_port,
        False,
        threads=threads,
        workers=1,
        timeout=0,
        accesslog=None,
    ).run()
