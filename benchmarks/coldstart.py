"""Figure 4: cold start, as the import time of each function's module and of the runner.

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
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import PY, REPO, Row, median, verdict

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


def _import_seconds(module: str, cwd: Path, runs: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``import module`` in ``runs`` fresh interpreters."""
    env = _environment()
    samples = []
    for _ in range(runs):
        completed = subprocess.run(
            [PY, "-c", _TIMER.format(module=module)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=120,
            check=True,
        )
        wall, cpu = completed.stdout.strip().splitlines()[-1].split()
        samples.append((float(wall), float(cpu)))
    return samples


def _self_times(module: str, cwd: Path) -> dict[str, int]:
    """``-X importtime``: microseconds of each module's own import work."""
    env = _environment()
    completed = subprocess.run(
        [PY, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=True,
    )
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
