"""``comfyswap``: run the service locally and talk to it.

  comfyswap run                       API (three functions) + runner, embedded defaults
  comfyswap api | runner              one of the two
  comfyswap swap --source S --target T [--resolution WxH] [--wait]
  comfyswap submit TEMPLATE|FILE.json [--param k=v ...] [--wait]
  comfyswap status TASK_ID | list | cancel TASK_ID | stats
  comfyswap keys new --owner O [--role r]

Exit codes: 0 done (COMPLETED, or created without --wait), 1 the task FAILED or was
CANCELLED, 2 bad usage or a 4xx from the API, 3 the service is unreachable or 5xx,
4 timed out waiting.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import mimetypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["main"]

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}


class CliError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _api_url(args: argparse.Namespace) -> str:
    if args.api_url:
        return str(args.api_url).rstrip("/")
    from shared.settings import get_settings

    settings = get_settings()
    return f"http://{settings.api_host}:{settings.api_port}"


def _client(args: argparse.Namespace) -> httpx.Client:
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    return httpx.Client(base_url=_api_url(args), headers=headers, timeout=60.0)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise CliError(
            f"cannot reach the API at {client.base_url}: {exc} (is `make run` running?)", 3
        ) from None
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {"detail": response.text[:500]}
    if response.status_code >= 500:
        raise CliError(f"API error {response.status_code}: {body.get('detail', body)}", EXIT_UNAVAILABLE)
    if response.status_code >= 400:
        raise CliError(f"refused ({response.status_code}): {body.get('detail', body)}", EXIT_USAGE)
    return body


def as_input_url(value: str) -> str:
    """A URL stays a URL; a local file becomes a base64 data: URL."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise CliError(f"no such file: {value}", EXIT_USAGE)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


_WAIT_CHUNK_S = 5.0  # per GET /api/tasks/{id}?wait=; the API takes at most 25


def _wait(client: httpx.Client, task_id: str, timeout_s: float, quiet: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout_s
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
        disable=quiet,
        transient=True,
    ) as bar:
        handle = bar.add_task(task_id, total=1.0, stage="PENDING")
        wait_s = 0.0  # the first answer at once (the bar shows the status), then long polls
        while True:
            # The API holds the request until the task ends or `wait` passes (at most 25 s);
            # 5 s chunks keep the progress bar moving.
            view = _call(client, "GET", f"/api/tasks/{task_id}", params={"wait": f"{wait_s:g}"})
            task = view["task"]
            progress = task.get("progress") or {}
            fraction = (progress.get("value", 0) / progress.get("max", 1)) if progress.get("max") else 0
            bar.update(
                handle, completed=fraction, stage=f"{view['status']} {progress.get('stage', '')}".strip()
            )
            if view["status"] in TERMINAL:
                return view
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CliError(f"task {task_id} still {view['status']} after {timeout_s:g}s", EXIT_TIMEOUT)
            wait_s = round(min(remaining, _WAIT_CHUNK_S), 3)


def _report(view: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(view, indent=2))
    status = view["status"]
    task = view["task"]
    if status == "COMPLETED":
        if not as_json:
            outputs = (task.get("output_data") or {}).get("outputs") or []
            print(f"{task['taskId']} COMPLETED")
            for output in outputs:
                print(f"  {output.get('content_type')}: {output.get('url')}")
        return EXIT_OK
    if not as_json:
        error = task.get("error") or {}
        print(f"{task['taskId']} {status}: {error.get('code', '')} {error.get('message', '')}".rstrip())
    return EXIT_OK if status not in TERMINAL else EXIT_TASK_FAILED


def cmd_swap(args: argparse.Namespace) -> int:
    task_data: dict[str, Any] = {
        "source_url": as_input_url(args.source),
        "target_url": as_input_url(args.target),
    }
    if args.resolution:
        task_data["resolution"] = args.resolution
    if args.model:
        task_data["model"] = args.model
    if args.face_selector is not None:
        task_data["face_selector"] = (
            int(args.face_selector) if args.face_selector.isdigit() else args.face_selector
        )
    return _create_and_follow(
        args, {"workflow": "face_swap", "environment": "face_swap", "task_data": task_data}
    )


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def cmd_submit(args: argparse.Namespace) -> int:
    params = {}
    for item in args.param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--param wants key=value, got {item!r}", EXIT_USAGE)
        params[key] = _parse_value(value)
    for key in [k for k in params if k.endswith("_url")]:
        params[key] = as_input_url(str(params[key]))
    workflow_path = Path(args.workflow)
    if args.workflow.endswith(".json") and workflow_path.is_file():
        graph = json.loads(workflow_path.read_text())
        body: dict[str, Any] = {"workflow": "custom", "environment": "comm", "task_data": {"wf_json": graph}}
    else:
        body = {"workflow": args.workflow, "environment": "auto", "task_data": params}
    return _create_and_follow(args, body)


def _create_and_follow(args: argparse.Namespace, body: dict[str, Any]) -> int:
    with _client(args) as client:
        created = _call(client, "POST", "/api/tasks/create", json=body)
        task_id = created["taskId"]
        if not args.wait:
            print(task_id)
            return EXIT_OK
        view = _wait(client, task_id, args.timeout, args.quiet)
        return _report(view, args.json)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _report(_call(client, "GET", f"/api/tasks/{args.task_id}"), args.json)


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = _call(client, "POST", f"/api/tasks/{args.task_id}/cancel")
        print(f"{args.task_id} {body['status']}")
        return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = _call(client, "GET", "/api/tasks/", params={"limit": args.limit})
    if args.json:
        print(json.dumps(body, indent=2))
        return EXIT_OK
    print(f"queue_length={body['queue_length']}")
    for task in body["tasks"]:
        timings = task.get("timings") or {}
        engine_s = timings.get("engine_s")
        print(
            f"{task['taskId']}  {task['status']:<10} {task['workflow']:<16} {task['created_at']}"
            + (f"  engine {engine_s:.2f}s" if engine_s is not None else "")
        )
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(_call(client, "GET", "/api/status"), indent=2))
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from shared.auth import hash_api_key, new_api_key

    key = new_api_key()
    roles = "+".join(args.role or ["client"])
    print(f"API key (shown once): {key}")
    print(f"Add to API_KEYS or API_KEYS_FILE: {hash_api_key(key)}:{args.owner}:{roles}")
    return EXIT_OK


def cmd_api(args: argparse.Namespace) -> int:
    from comfyswap.devserver import serve
    from shared.auth import open_mode
    from shared.settings import get_settings

    settings = get_settings()
    if open_mode(settings):
        sys.stderr.write(
            f"comfyswap: no API keys configured: the API is OPEN to anyone who can reach "
            f"{settings.api_host}:{settings.api_port} (local use only; set API_KEYS for anything else)\n"
        )
    serve(settings)
    return EXIT_OK


def cmd_runner(args: argparse.Namespace) -> int:
    from gpu_runner.supervisor import main as runner_main  # `python -m gpu_runner`

    runner_main()
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """The API and the runner as two child processes; Ctrl-C stops both."""
    from shared.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TASK_API_URL": f"http://{settings.api_host}:{settings.api_port}/api"}
    children = [
        subprocess.Popen([sys.executable, "-m", "comfyswap.cli", "api"], env=env),
        subprocess.Popen([sys.executable, "-m", "comfyswap.cli", "runner"], env=env),
    ]
    print(
        f"ComfySwap running: API http://{settings.api_host}:{settings.api_port}  "
        f"runner http://{settings.runner_host}:{settings.runner_port}  data {settings.data_dir}\n"
        f"Try: make demo, or open http://{settings.api_host}:{settings.api_port}/console   (Ctrl-C stops)",
        flush=True,
    )

    def stop(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        _wait_for_a_child(children)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        for child in children:
            try:
                child.wait(timeout=settings.shutdown_grace_s + 10)
            except subprocess.TimeoutExpired:
                child.kill()
    return max((child.returncode or 0) for child in children) and EXIT_UNAVAILABLE


def _wait_for_a_child(children: list[subprocess.Popen[bytes]]) -> None:
    """Sleep until a child exits (SIGTERM's handler stops them all): no polling loop, so
    `make run` costs nothing while nothing happens. WNOWAIT leaves the exit status for
    Popen to collect; where waitid is missing, look every half second."""
    waitid = getattr(os, "waitid", None)
    while all(child.poll() is None for child in children):
        if waitid is None:
            time.sleep(0.5)
            continue
        with contextlib.suppress(ChildProcessError):
            waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)


def cmd_demo(args: argparse.Namespace) -> int:
    """Swap Grace Hopper's face onto the astronaut (the photos shipped in comfyswap/samples)."""
    from comfyswap.samples import ASTRONAUT_PNG, GRACE_HOPPER_JPG

    source, target = GRACE_HOPPER_JPG, ASTRONAUT_PNG
    print(f"source: {source}\ntarget: {target}")
    args.source, args.target = str(source), str(target)
    args.resolution, args.model, args.face_selector, args.wait = None, None, None, True
    code = cmd_swap(args)
    if code == EXIT_OK and not args.json:
        print("Open the URL above to see the result.")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfyswap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-url", default=os.environ.get("COMFYSWAP_API_URL"), help="default: local API")
    parser.add_argument("--api-key", default=os.environ.get("COMFYSWAP_API_KEY"), help="X-API-Key to send")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    commands = parser.add_subparsers(dest="command", required=True)

    def waiting(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--wait", action="store_true", help="follow the task to its end")
        sub.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")

    commands.add_parser("run", help="API + runner on embedded defaults").set_defaults(func=cmd_run)
    commands.add_parser("api", help="the local API only").set_defaults(func=cmd_api)
    commands.add_parser("runner", help="the runner only").set_defaults(func=cmd_runner)
    swap = commands.add_parser("swap", help="create a face swap")
    swap.add_argument("--source", required=True, help="face: file path or URL")
    swap.add_argument("--target", required=True, help="image or video: file path or URL")
    swap.add_argument("--resolution", help="WxH, e.g. 1024x1024")
    swap.add_argument("--model", help="swapper model (default inswapper_128_fp16)")
    swap.add_argument("--face-selector", help="largest | all | index")
    waiting(swap)
    swap.set_defaults(func=cmd_swap)
    submit = commands.add_parser("submit", help="run a ComfyUI template or workflow file")
    submit.add_argument("workflow", help="template name (basic_generation, ...) or API-format .json")
    submit.add_argument("--param", action="append", help="template parameter key=value (repeat)")
    waiting(submit)
    submit.set_defaults(func=cmd_submit)
    status = commands.add_parser("status", help="show one task")
    status.add_argument("task_id")
    status.set_defaults(func=cmd_status)
    cancel = commands.add_parser("cancel", help="cancel a task")
    cancel.add_argument("task_id")
    cancel.set_defaults(func=cmd_cancel)
    listing = commands.add_parser("list", help="list tasks")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(func=cmd_list)
    commands.add_parser("stats", help="component health and queue numbers").set_defaults(func=cmd_stats)
    keys = commands.add_parser("keys", help="make an API key (prints its digest entry)")
    keys.add_argument("action", choices=["new"])
    keys.add_argument("--owner", required=True)
    keys.add_argument("--role", action="append", choices=["client", "admin", "raw_workflows", "runner"])
    keys.set_defaults(func=cmd_keys)
    demo = commands.add_parser("demo", help="swap the sample faces against the running service")
    demo.add_argument("--timeout", type=float, default=300.0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        sys.stderr.write(f"comfyswap: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
