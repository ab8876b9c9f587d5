"""The local API: the three functions on one port, as the cloud gateway serves them.

Each function is loaded by functions-framework from its own folder (exactly as Cloud
Functions loads it), and requests are routed by path the way the API Gateway config in
infra/terraform routes them. Runner routes (``/api/face-swap/process``, ComfyUI queue,
results under ``/results/``) are forwarded to the runner, so a client needs one host.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import flask
import httpx
from functions_framework import create_app

from shared.settings import Settings

__all__ = ["FUNCTION_ROUTES", "RUNNER_PREFIXES", "build_app", "serve"]

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_DIR = ROOT / "functions"

# (method, path regex) -> function; the gateway (infra/terraform) routes the same way.
FUNCTION_ROUTES: list[tuple[str, str, str]] = [
    ("POST", r"/api/tasks/create/?", "create_task"),
    ("POST", r"/api/face-swap/create-task/?", "create_task"),
    ("POST", r"/api/tasks/[^/]+/cancel/?", "create_task"),
    ("GET", r"/api/tasks/?", "get_task"),
    ("GET", r"/api/tasks/[^/]+/?", "get_task"),
    ("GET", r"/api/face-swap/queue-status/?", "get_task"),
    ("GET", r"/api/health/?", "get_task"),
    ("GET", r"/api/status/?", "get_task"),
    ("POST", r"/internal/reap/?", "get_task"),
    ("GET", r"/api/openapi\.json", "get_task"),
    ("GET", r"/api/comm/task/fetch/?", "fetch_task"),
]

RUNNER_PREFIXES: tuple[str, ...] = (
    "/api/face-swap/process",
    "/api/face-swap/health",
    "/api/face-swap/workflows",
    "/api/comfyui-queue-status",
    "/api/comfyui-system-stats",
    "/api/comfyui-interrupt",
    "/api/runner/",
    "/results/",
)

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


def _load_function(name: str) -> flask.Flask:
    app: flask.Flask = create_app(target=name, source=str(FUNCTIONS_DIR / name / "main.py"))  # type: ignore[no-untyped-call]  # functions-framework is untyped
    return app


def build_app(settings: Settings) -> flask.Flask:
    """A Flask app that sends each request to the function (or runner) that owns it."""
    functions = {name: _load_function(name) for name in ("create_task", "get_task", "fetch_task")}
    compiled = [(method, re.compile(f"^{pattern}$"), name) for method, pattern, name in FUNCTION_ROUTES]
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

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith(RUNNER_PREFIXES):
            return forwarder(environ, start_response)
        owner = next((name for m, regex, name in compiled if regex.match(path) and m == method), None)
        owner = owner or next((name for _, regex, name in compiled if regex.match(path)), None)
        target = functions[owner].wsgi_app if owner else fallback.wsgi_app
        return target(environ, start_response)

    app.wsgi_app = wsgi  # type: ignore[method-assign]
    return app


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
