"""``python -m benchmarks.run`` (``make bench``): every figure of issues 8, 14 and 18 in one table.

Parts run one after another, each bounded in time, in one temp dir that is removed at
the end: cold start (4) first, while nothing else of ours runs; the engines (5) and
storage (6) next; the operations each task causes on the managed services (7, on the
emulators: issue 14), the ComfyUI path against a direct ComfyUI client (8: issue 18) and
many runners claiming from one Firestore queue, then fed by a push dispatcher (9: issue
14), and the capacity model's simulation checked against the pull runs, then at 1,000
tasks/s (10: issue 14, docs/scale.md);
then the embedded stack is started once for the orchestration
overhead (2), the runner's efficiency (1) and the API cost (3, last: it leaves thousands
of PENDING tasks behind). A part that lacks a dependency prints ``not measured: <reason>``;
one that raises prints ``failed: <error>`` (its traceback on stderr) and the run exits 1
once the others are measured. The table goes to stdout and build/bench/latest.md.

    python -m benchmarks.run                 # everything (8 to 10 minutes on 2 cores)
    python -m benchmarks.run --only 1,2      # some figures
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import REPO, Row, failed, not_measured

__all__ = ["main"]

BUDGET_S = 15 * 60
LATEST = REPO / "build" / "bench" / "latest.md"
HEADERS = ("figure", "measured", "target", "baseline (same run)", "verdict")

Part = Callable[[Path], list[Row]]


def _cold_start(workdir: Path) -> list[Row]:
    from benchmarks.coldstart import cold_start, first_response_rows

    rows = cold_start()
    return rows + _guarded("4. cold start, first answer", lambda: first_response_rows(workdir))


def _engines(workdir: Path) -> list[Row]:
    from benchmarks.engine_speed import comfyui_overhead, cpu_swap_rows
    from benchmarks.facefusion_warm import facefusion_rows

    rows = _guarded("5. CPU face swap", lambda: cpu_swap_rows(workdir / "cpu-swap"))
    rows += _guarded("5. FaceFusion image job", lambda: facefusion_rows(workdir / "facefusion"))
    (workdir / "comfyui").mkdir()
    return rows + _guarded("5. ComfyUI path", lambda: comfyui_overhead(workdir / "comfyui"))


def _operations(workdir: Path) -> list[Row]:
    from benchmarks.ops import operation_rows

    return operation_rows(workdir)


def _comfyui_floor(workdir: Path) -> list[Row]:
    from benchmarks.comfyui_floor import comfyui_floor_rows

    return comfyui_floor_rows(workdir)


def _many_runners(workdir: Path) -> list[Row]:
    from benchmarks.scale import ENGINE_S, push_rows, scale_rows
    from benchmarks.scale_sim import sim_rows

    measured: list[dict[str, object]] = []
    rows = scale_rows(workdir, measured)
    rows += _guarded("9. many runners, push mode", lambda: push_rows(workdir))
    return rows + _guarded("10. simulation", lambda: sim_rows(measured, ENGINE_S))


def _storage(workdir: Path) -> list[Row]:
    from benchmarks.storage import storage_rows

    return storage_rows(workdir)


def _stack_parts(figures: set[str]) -> Part:
    def run(workdir: Path) -> list[Row]:
        from benchmarks.api import api_cost
        from benchmarks.common import start_stack
        from benchmarks.pipeline import efficiency_rows, orchestration_overhead
        from shared.settings import Settings

        rows: list[Row] = []
        with start_stack(workdir) as stack:
            if "2" in figures:
                rows += _guarded("2. orchestration overhead", lambda: orchestration_overhead(stack, count=50))
            if "1" in figures:
                settings = Settings(data_dir=workdir / "baseline-data", fetch_allow_loopback=True)
                rows += _guarded(
                    "1. runner efficiency", lambda: efficiency_rows(stack, settings, count=20, cost_ms=300)
                )
            if "3" in figures:
                rows += _guarded("3. API cost", lambda: api_cost(stack))
        return rows

    return run


def _guarded(figure: str, part: Callable[[], list[Row]]) -> list[Row]:
    """A part that raises is a FAILED row (the rest of the run goes on); a part that lacks a
    dependency returns its own ``not measured`` rows."""
    try:
        return part()
    except Exception as exc:
        return [failed(figure, exc)]


def _machine() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607  # git from PATH, as make finds it
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "?"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}, commit {commit}, load average {load}"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(
    rows: list[Row],
    *,
    started: str,
    machine_before: str,
    machine_after: str,
    seconds: float,
    busy: bool = False,
) -> str:
    lines = [
        f"Benchmarks: `make bench` (`python -m benchmarks.run`), {started}, {seconds:.0f} s.",
        f"Machine at start: {machine_before}.",
        f"Machine at end: {machine_after}.",
    ]
    if busy:
        lines.append(
            "The machine was busy with other work (load average above its core count): latencies and "
            "rates are pessimistic; the CPU-per-task and CPU-per-request notes are not."
        )
    lines += [
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    notes: list[str] = []
    for row in rows:
        figure = row.figure
        if row.note:
            notes.append(row.note)
            figure += f" [{len(notes)}]"
        lines.append(
            "| "
            + " | ".join(
                _cell(value) for value in (figure, row.measured, row.target, row.baseline, row.verdict)
            )
            + " |"
        )
    if notes:
        lines.append("")
        lines += [f"[{index}] {_cell(note)}" for index, note in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the performance figures of issues 8, 14 and 18.")
    parser.add_argument(
        "--only", default="1,2,3,4,5,6,7,8,9", help="comma-separated figure numbers (default: all)"
    )
    args = parser.parse_args(argv)
    figures = {part.strip() for part in args.only.split(",") if part.strip()}

    started_at = time.monotonic()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine_before = _machine()
    busy_before = os.getloadavg()[0] > (os.cpu_count() or 1)
    parts: list[tuple[str, str, Part]] = [
        ("4", "4. cold start", _cold_start),
        ("5", "5. engines", _engines),
        ("6", "6. storage", _storage),
        ("7", "7. operations per task", _operations),
        ("8", "8. ComfyUI path vs direct client", _comfyui_floor),
        ("9", "9. many runners", _many_runners),
    ]
    stack_figures = figures & {"1", "2", "3"}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="comfyswap-bench-") as tmp:
        workdir = Path(tmp)
        for number, name, part in parts:
            if number not in figures:
                continue
            if time.monotonic() - started_at > BUDGET_S:
                rows.append(not_measured(name, "time budget of the run used up"))
                continue
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            part_dir = workdir / f"part-{number}"
            part_dir.mkdir()
            rows += _guarded(name, lambda part=part, part_dir=part_dir: part(part_dir))  # type: ignore[misc]
        if stack_figures:
            print(
                f"[bench] figures {', '.join(sorted(stack_figures))} on the embedded stack ...",
                file=sys.stderr,
                flush=True,
            )
            stack_dir = workdir / "stack"
            stack_dir.mkdir()
            rows += _guarded("1-3. embedded stack", lambda: _stack_parts(stack_figures)(stack_dir))
    rows.sort(key=lambda row: row.figure.split(".")[0])
    busy = busy_before or os.getloadavg()[0] > (os.cpu_count() or 1)
    table = render(
        rows,
        started=started,
        machine_before=machine_before,
        machine_after=_machine(),
        seconds=time.monotonic() - started_at,
        busy=busy,
    )
    LATEST.parent.mkdir(parents=True, exist_ok=True)
    LATEST.write_text(table)
    sys.stdout.write(table)
    broken = [row.figure for row in rows if row.verdict == "FAILED"]
    if broken:
        print(f"[bench] FAILED (traceback above): {'; '.join(broken)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
