"""Figure 4: cold start, as the import time of each function's module and of the runner.

Each function is imported the way functions-framework loads it: a fresh interpreter whose
working directory is the function's folder, ``import main`` (``shared/`` comes from the
repository on PYTHONPATH, as ``make bundle`` puts it next to ``main.py``). The baseline
is ``import functions_framework`` in the same kind of fresh interpreter. The median of
several runs is reported; one extra run with ``-X importtime`` says which packages the
function adds on top of the framework, when it misses the target.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
from pathlib import Path

from benchmarks.common import PY, REPO, Row, median, verdict

__all__ = ["cold_start"]

RATIO_TARGET = 2.0
_TIMER = "import time as _t; _s = _t.perf_counter(); import {module}; print(_t.perf_counter() - _s)"
_IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)$")


def _import_seconds(module: str, cwd: Path, runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
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
        samples.append(float(completed.stdout.strip().splitlines()[-1]))
    return samples


def _self_times(module: str, cwd: Path) -> dict[str, int]:
    """``-X importtime``: microseconds of each module's own import work."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
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
    samples: dict[str, list[float]] = {label: [] for label, _, _ in targets}
    for _ in range(runs):
        for label, module, cwd in targets:
            samples[label] += _import_seconds(module, cwd, 1)
    bare_label = targets[0][0]
    bare = median(samples[bare_label])
    baseline_modules = _self_times("functions_framework", REPO)
    rows = []
    for label, module, cwd in targets[1:]:
        seconds = median(samples[label])
        ratio = seconds / bare
        ok = ratio <= RATIO_TARGET
        heaviest = "" if ok else _heaviest_additions(module, cwd, baseline_modules)
        note = f"{label}: heaviest imports beyond the framework (self time): {heaviest}" if heaviest else ""
        rows.append(
            Row(
                f"4. cold start: import {label} (median of {runs})",
                f"{seconds * 1000:.0f} ms = {ratio:.2f}x bare",
                f"<= {RATIO_TARGET:g}x bare",
                f"import functions_framework: {bare * 1000:.0f} ms",
                verdict(ok),
                note,
            )
        )
    return rows
