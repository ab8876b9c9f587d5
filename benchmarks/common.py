"""What every part of the benchmark shares: result rows, statistics, servers on loopback.

Servers are started with ``tests.servers.start_server`` (own process group, output to a
file, bounded wait) on a free 127.0.0.1 port and stopped by their PID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

from tests.servers import ServerProcess, free_port, start_server

__all__ = [
    "PY",
    "REPO",
    "BenchStack",
    "Row",
    "environment",
    "fmt_ms",
    "median",
    "not_measured",
    "percentile",
    "png_of_size",
    "process_tree_cpu_s",
    "run_json_subprocess",
    "start_stack",
]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in os.environ for the block, the previous values back after it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclasses.dataclass
class Row:
    """One line of the table. ``verdict``: ``meets``, ``MISSES``, ``info``, ``not measured``
    or ``FAILED``."""

    figure: str
    measured: str
    target: str
    baseline: str
    verdict: str
    note: str = ""


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process and its children (e.g. gunicorn's worker)."""
    process = psutil.Process(pid)
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        times = member.cpu_times()
        total += times.user + times.system
    return total


def machine_busy_s() -> float:
    """CPU seconds every process of this machine has used so far, all cores (/proc/stat's
    busy fields: all but idle and iowait); 0.0 where /proc is not there."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def not_measured(figure: str, reason: str) -> Row:
    """A figure this machine cannot measure (no emulator, no real peer, no time left)."""
    return Row(figure, f"not measured: {reason}", "", "", "not measured")


def failed(figure: str, exc: BaseException) -> Row:
    """A figure whose measurement raised: a defect in the benchmark or in the product, not
    a missing dependency. Its traceback goes to stderr and ``make bench`` exits 1."""
    traceback.print_exception(exc, file=sys.stderr)
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    return Row(figure, f"failed: {type(exc).__name__}: {first_line}", "", "", "FAILED")


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def png_of_size(target_bytes: int, *, seed: int = 0) -> bytes:
    """A real PNG of noise close to ``target_bytes`` (noise does not compress)."""
    side = max(8, int(math.sqrt(target_bytes / 3)))
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def run_json_subprocess(args: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m ...`` in a fresh process and parse the JSON of its last stdout line."""
    completed = subprocess.run(
        [PY, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(args)} exited {completed.returncode}: {last_line}")
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{' '.join(args)} printed nothing: {completed.stderr[-2000:]}")
    return json.loads(lines[-1])


class BenchStack:
    """The embedded stack as `make run` starts it, plus a static file server for inputs.

    The dev server (three functions, gunicorn threads) runs as `comfyswap api`; runners are
    started per scenario with an injected engine (``benchmarks.runner_main``); inputs are
    served from ``media_dir`` by ``benchmarks.media_server``, a process of its own like a
    remote origin would be.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.media_dir = workdir / "media"
        self.log_dir = workdir / "logs"
        self.media_dir.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            "DATA_DIR": str(self.data_dir),
            "API_PORT": str(self.api_port),
            "TASK_API_URL": f"{self.api_url}/api",
            "FETCH_ALLOW_LOOPBACK": "true",
            "RUNNER_ENVIRONMENTS": "face_swap",
            "LOG_LEVEL": "INFO",
            "PYTHONPATH": str(REPO),
        }
        self.servers: list[ServerProcess] = []
        self.media_url = ""
        self.client = httpx.Client(base_url=self.api_url, timeout=30.0)

    def start(self) -> None:
        media_port = free_port()
        self.media_url = f"http://127.0.0.1:{media_port}"
        self.servers.append(
            start_server(
                "media",
                [PY, "-m", "benchmarks.media_server", str(media_port), str(self.media_dir)],
                url=self.media_url,
                log_dir=self.log_dir,
                env={"PYTHONPATH": str(REPO)},
                timeout_s=20,
                cwd=REPO,
            )
        )
        self.servers.append(
            start_server(
                "api",
                [PY, "-m", "comfyswap.cli", "api"],
                url=self.api_url,
                log_dir=self.log_dir,
                env=self.env,
                health_path="/api/health",
                timeout_s=60,
                cwd=REPO,
            )
        )

    @property
    def api_pid(self) -> int:
        return next(server.pid for server in self.servers if server.name == "api")

    def put_media(self, name: str, payload: bytes) -> str:
        (self.media_dir / name).write_bytes(payload)
        return f"{self.media_url}/{name}"

    @contextlib.contextmanager
    def runner(self, name: str, engine_args: Sequence[str]) -> Iterator[tuple[ServerProcess, float]]:
        """A runner subprocess with the engine ``engine_args`` describe; yields it and the
        seconds from spawn to its first /api/health answer."""
        port = free_port()
        started = time.perf_counter()
        server = start_server(
            name,
            [PY, "-m", "benchmarks.runner_main", *engine_args],
            url=f"http://127.0.0.1:{port}",
            log_dir=self.log_dir,
            env={**self.env, "RUNNER_PORT": str(port), "RUNNER_ID": name},
            health_path="/api/health",
            timeout_s=90,
            cwd=REPO,
        )
        ready_s = time.perf_counter() - started
        try:
            yield server, ready_s
        finally:
            server.stop()

    def create_face_swap(self, source_url: str, target_url: str) -> str:
        body = {
            "workflow": "face_swap",
            "environment": "face_swap",
            "task_data": {"source_url": source_url, "target_url": target_url},
        }
        response = self.client.post("/api/tasks/create", json=body)
        response.raise_for_status()
        return str(response.json()["taskId"])

    def get_task(self, task_id: str, *, wait_s: float = 0.0) -> dict[str, Any]:
        """The task; with ``wait_s``, once it ended or the wait did (``?wait=``)."""
        if wait_s > 0:
            params, timeout = {"wait": f"{wait_s:.3f}"}, wait_s + 30.0
            response = self.client.get(f"/api/tasks/{task_id}", params=params, timeout=timeout)
        else:
            response = self.client.get(f"/api/tasks/{task_id}")
        response.raise_for_status()
        task: dict[str, Any] = response.json()["task"]
        return task

    def long_poll_terminal(self, task_id: str, *, timeout_s: float) -> dict[str, Any]:
        """The task once it has ended, by ``GET /api/tasks/{id}?wait=`` (what the README tells
        clients to do): no requests while it runs, unlike ``wait_terminal``'s polling."""
        deadline = time.monotonic() + timeout_s
        while True:
            task = self.get_task(task_id, wait_s=max(0.001, min(20.0, deadline - time.monotonic())))
            if task["status"] in TERMINAL:
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"{task_id} still {task['status']} after {timeout_s:g}s")

    def wait_terminal(self, task_id: str, *, timeout_s: float, interval_s: float = 0.02) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            task = self.get_task(task_id)
            if task["status"] in TERMINAL:
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"{task_id} still {task['status']} after {timeout_s:g}s")
            time.sleep(interval_s)

    def stop(self) -> None:
        self.client.close()
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()


@contextlib.contextmanager
def start_stack(workdir: Path) -> Iterator[BenchStack]:
    stack = BenchStack(workdir)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
