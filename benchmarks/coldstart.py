"""Figure 4: cold start, as the import time of each function's module and of the runner,
and as a user sees it: process start to the first answered request (issue 15, item 5).

Each function is imported the way functions-framework loads it: a fresh interpreter whose
working directory is the function's folder, ``import main`` (``shared/`` comes from the
repository on PYTHONPATH, as ``make bundle`` puts it next to ``main.py``). The baseline
is ``import functions_framework`` in the same kind of fresh interpreter. The median of
several runs is reported, as CPU time (the process's own work: on an idle machine it
equals the wall time, and it stays put when other work shares the cores) next to the
wall time; one extra run with ``-X importtime`` says which packages the
function adds on top of the framework, when it misses the target.

Bytecode caches are on for every import (``PYTHONDONTWRITEBYTECODE`` is dropped, caches go
to a private ``PYTHONPYCACHEPREFIX``): with them off, the project's modules would be
compiled from source at every start while the installed packages' caches are read, and
the comparison would measure the compiler.

The first-response rows start each function as it is served (``benchmarks.serve_function``:
functions-framework's gunicorn app, as the API figure serves it), send one request that
builds its clients (create_task creates a task: store and dispatcher; get_task reads an
unknown task: a 404 from the store; fetch_task claims from an empty queue), retrying only
while the port refuses connections, and time process start to that answer. The baseline
is the bare function (benchmarks/bare_function) started and asked the same way. CPU time
is the server's process tree's (gunicorn's arbiter and worker) at the answer.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import PY, REPO, Row, median, process_tree_cpu_s, verdict
from tests.servers import free_port

__all__ = ["cold_start"]

RATIO_TARGET = 2.0
_TIMER = (
    "import time as _t; _w, _c = _t.perf_counter(), _t.process_time(); import {module}; "
    "print(_t.perf_counter() - _w, _t.process_time() - _c)"
)
_PYCACHE = Path(tempfile.gettempdir()) / "comfyswap-bench-pycache"
_IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)$")


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(_PYCACHE)}


def _python(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter with the bench environment, its output captured."""
    return subprocess.run(
        [PY, *arguments], capture_output=True, text=True, cwd=cwd, env=_environment(), timeout=120, check=True
    )


def _import_seconds(module: str, cwd: Path, runs: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``import module`` in ``runs`` fresh interpreters."""
    samples = []
    for _ in range(runs):
        completed = _python(["-c", _TIMER.format(module=module)], cwd)
        wall, cpu = completed.stdout.strip().splitlines()[-1].split()
        samples.append((float(wall), float(cpu)))
    return samples


def _self_times(module: str, cwd: Path) -> dict[str, int]:
    """``-X importtime``: microseconds of each module's own import work."""
    completed = _python(["-X", "importtime", "-c", f"import {module}"], cwd)
    times: dict[str, int] = {}
    for line in completed.stderr.splitlines():
        match = _IMPORTTIME_LINE.match(line)
        if match:
            times[match.group(4)] = int(match.group(1))
    return times


def _package_of(module: str) -> str:
    """First-party modules by name (the fix is in them); third-party by distribution."""
    if module == "main" or module.startswith(("shared.", "gpu_runner.")):
        return module
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[0] == "google" else parts[0]


def _heaviest_additions(module: str, cwd: Path, baseline: dict[str, int], top: int = 8) -> str:
    """Modules imported by ``module`` but not by the bare framework, by their own import time."""
    by_package: collections.Counter[str] = collections.Counter()
    for name, self_us in _self_times(module, cwd).items():
        if name not in baseline:
            by_package[_package_of(name)] += self_us
    return ", ".join(f"{package} {us / 1000:.0f} ms" for package, us in by_package.most_common(top))


def cold_start(*, runs: int = 5) -> list[Row]:
    targets: list[tuple[str, str, Path]] = [
        ("functions_framework (bare)", "functions_framework", REPO),
        *(
            (f"functions/{name}", "main", REPO / "functions" / name)
            for name in ("create_task", "get_task", "fetch_task")
        ),
        ("gpu_runner.app (runner)", "gpu_runner.app", REPO),
    ]
    # One warm-up each (OS file cache, bytecode caches: cold start is about Python work,
    # not the first disk read after an install), then rounds that interleave the targets
    # so that load from elsewhere on the machine lands on all of them alike.
    for _, module, cwd in targets:
        _import_seconds(module, cwd, 1)
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in targets}
    for _ in range(runs):
        for label, module, cwd in targets:
            samples[label] += _import_seconds(module, cwd, 1)
    bare_label = targets[0][0]
    bare_wall = median([wall for wall, _ in samples[bare_label]])
    bare_cpu = median([cpu for _, cpu in samples[bare_label]])
    baseline_modules = _self_times("functions_framework", REPO)
    rows = []
    for label, module, cwd in targets[1:]:
        wall = median([wall for wall, _ in samples[label]])
        cpu = median([cpu for _, cpu in samples[label]])
        ratio = cpu / bare_cpu
        ok = ratio <= RATIO_TARGET
        heaviest = "" if ok else _heaviest_additions(module, cwd, baseline_modules)
        note = f"{label}: heaviest imports beyond the framework (self time): {heaviest}" if heaviest else ""
        rows.append(
            Row(
                f"4. cold start: import {label} (median of {runs}, CPU time)",
                f"{cpu * 1000:.0f} ms = {ratio:.2f}x bare "
                f"(wall {wall * 1000:.0f} ms = {wall / bare_wall:.2f}x)",
                f"<= {RATIO_TARGET:g}x bare",
                f"import functions_framework: {bare_cpu * 1000:.0f} ms CPU, {bare_wall * 1000:.0f} ms wall",
                verdict(ok),
                note,
            )
        )
    return rows


# --- process start to the first answered request ------------------------------------------
_FIRST_REQUESTS: dict[str, tuple[str, str, bytes]] = {
    "bare": ("GET", "/", b""),
    "create_task": (
        "POST",
        "/api/tasks/create",
        json.dumps(
            {
                "workflow": "face_swap",
                "environment": "face_swap",
                "task_data": {
                    "source_url": "http://127.0.0.1:9/source.png",
                    "target_url": "http://127.0.0.1:9/target.png",
                },
            }
        ).encode(),
    ),
    "get_task": ("GET", "/api/tasks/task_00000000000000000000000000000000", b""),
    "fetch_task": ("GET", "/api/comm/task/fetch", b""),
}
_ANSWERED = {"bare": 200, "create_task": 200, "get_task": 404, "fetch_task": 200}
_FIRST_RESPONSE_DEADLINE_S = 120.0


def _first_response(target: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds from process start to the answer of its first request."""
    source = (
        REPO / "benchmarks" / "bare_function" / "main.py"
        if target == "bare"
        else REPO / "functions" / target / "main.py"
    )
    port = free_port()
    method, path, body = _FIRST_REQUESTS[target]
    headers = {"Content-Type": "application/json"} if body else {}
    started = time.perf_counter()
    process = subprocess.Popen(
        [PY, "-m", "benchmarks.serve_function", target, str(source), str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while True:
            if time.perf_counter() - started > _FIRST_RESPONSE_DEADLINE_S or process.poll() is not None:
                raise RuntimeError(f"{target} gave no answer (exit code {process.poll()})")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                connection.request(method, path, body=body or None, headers=headers)
                status = connection.getresponse().status
            except ConnectionRefusedError:
                time.sleep(0.002)  # not listening yet: the only case that is retried
                continue
            finally:
                connection.close()
            wall = time.perf_counter() - started
            if status != _ANSWERED[target]:
                raise RuntimeError(f"{target}: first request answered HTTP {status}")
            return wall, process_tree_cpu_s(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def first_response_rows(workdir: Path, *, runs: int = 3) -> list[Row]:
    env = {
        **_environment(),
        "DATA_DIR": str(workdir / "data"),
        "FETCH_ALLOW_LOOPBACK": "true",
        "RUNNER_ENVIRONMENTS": "face_swap",
        "LOG_LEVEL": "WARNING",
    }
    targets = ["bare", "create_task", "get_task", "fetch_task"]
    # One warm-up each (file caches, bytecode, the SQLite schema: a store that exists, as
    # Firestore does), then interleaved rounds, as for the import rows.
    for target in targets:
        _first_response(target, env)
    samples: dict[str, list[tuple[float, float]]] = {target: [] for target in targets}
    for _ in range(runs):
        for target in targets:
            samples[target].append(_first_response(target, env))
    bare_wall = median([wall for wall, _ in samples["bare"]])
    bare_cpu = median([cpu for _, cpu in samples["bare"]])
    rows = []
    for target in targets[1:]:
        wall = median([wall for wall, _ in samples[target]])
        cpu = median([cpu for _, cpu in samples[target]])
        method, path, _ = _FIRST_REQUESTS[target]
        rows.append(
            Row(
                f"4. cold start: {target}, process start to first answer (median of {runs}, CPU time)",
                f"{cpu * 1000:.0f} ms = {cpu / bare_cpu:.2f}x bare (wall {wall * 1000:.0f} ms = "
                f"{wall / bare_wall:.2f}x)",
                f"<= {RATIO_TARGET:g}x bare (issue 15)",
                f"bare function started and asked the same way: {bare_cpu * 1000:.0f} ms CPU, "
                f"{bare_wall * 1000:.0f} ms wall",
                verdict(cpu / bare_cpu <= RATIO_TARGET),
                f"{target}: first request {method} {path}, answered with its clients built "
                "(the store, and for create_task the dispatcher); served by functions-framework's "
                "gunicorn app as in figure 3",
            )
        )
    return rows
