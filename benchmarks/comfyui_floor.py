"""Figure 8: the whole ComfyUI path (API + runner) against a direct ComfyUI client, the floor.

The floor is the least a client of ComfyUI can do: one websocket, ``POST /prompt``, wait
for the end of its prompt, ``GET /view`` of the output. ComfySwap is measured end to end
as a client sees it: ``POST /api/tasks/create`` (a raw ComfyUI graph), ``GET
/api/tasks/{id}?wait=25`` until COMPLETED, ``GET`` of the result URL. Both run the same
64x64 EmptyImage -> ImageInvert -> SaveImage graph (a new colour each time: ComfyUI
caches identical prompts) against the same ComfyUI, interleaved in the same run:

* the real ComfyUI (``make peers`` installs it under .tools/comfyui, run on CPU), when
  installed, and the recorded-protocol double (tests/fakes/comfyui_double.py);
* overhead per job: median of ComfySwap minus median of the floor (sequential jobs);
* throughput with 8 concurrent clients (each its own socket for the floor), the best of 3
  interleaved rounds on each side;
* wrapper CPU per job: CPU time of the API and runner processes over the sequential jobs;
* CPU at idle: the API and the runner over 10 s with nothing to do;
* where the machine goes per job on each side during the 8-client rounds (ComfyUI, this
  benchmark's client, the API, the runner; every thread's schedstat) and the cores busy
  meanwhile (/proc/stat): ComfySwap's rate cannot pass the cores over its whole CPU per
  job, so its ratio cannot pass that over the floor's rate (nor the floor's CPU per job
  over its own): the ceiling printed beside the measured ratio, with the API + runner CPU
  per job 0.8x would need.

The API and the runner are the product's own processes (``comfyswap api``, ``python -m
gpu_runner``), on the embedded store, with ENGINE_SLOTS=8 so concurrent jobs reach
ComfyUI's queue as the floor's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import PY, REPO, Row, failed, fmt_ms, machine_busy_s, median, not_measured
from tests.fakes import comfyui_double
from tests.peers import comfyui_peer
from tests.peers.comfyui_peer import start_real_comfyui
from tests.servers import ServerProcess, free_port, start_server

__all__ = ["comfyui_floor_rows"]

OVERHEAD_TARGET_S = 0.010
THROUGHPUT_TARGET = 0.8
CPU_PER_JOB_TARGET_S = 0.015
IDLE_TARGET_MS_PER_S = 2.0
CONCURRENCY = 8
CONCURRENT_ROUNDS = 3


def _graph(colour: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": colour},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "floor"}},
    }


class _Colours:
    """A new colour per prompt across the whole run (ComfyUI would answer a repeat from cache)."""

    def __init__(self) -> None:
        self._next = 1

    def take(self) -> int:
        self._next += 1
        return self._next


# --- the floor: a direct client ----------------------------------------------------------
Span = tuple[float, float]  # one job's start and end (perf_counter)


async def _direct_jobs(base_url: str, colours: _Colours, count: int) -> list[Span]:
    import websockets

    client_id = f"floor-{uuid.uuid4().hex[:8]}"
    spans: list[Span] = []
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=60) as http,
        websockets.connect(
            f"ws{base_url.removeprefix('http')}/ws?clientId={client_id}",
            max_size=None,
            compression=None,
            close_timeout=1,
        ) as socket,
    ):
        for _ in range(count):
            started = time.perf_counter()
            for image in await run_direct_prompt(http, socket, client_id, _graph(colours.take())):
                (await http.get("/view", params=image)).raise_for_status()
            spans.append((started, time.perf_counter()))
    return spans


async def run_direct_prompt(
    http: httpx.AsyncClient, socket: Any, client_id: str, prompt: dict[str, Any]
) -> list[dict[str, Any]]:
    """POST one prompt and read the socket until it ends; the images it saved."""
    prompt_id = str(uuid.uuid4())
    body = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
    (await http.post("/prompt", json=body)).raise_for_status()
    images: list[dict[str, Any]] = []
    while True:
        message = await asyncio.wait_for(socket.recv(), timeout=60)
        if isinstance(message, bytes):
            continue
        event = json.loads(message)
        data = event.get("data", {})
        if data.get("prompt_id") != prompt_id:
            continue
        if event["type"] == "executed":
            images.extend(data.get("output", {}).get("images", []))
        if event["type"] in ("execution_error", "execution_interrupted"):
            raise RuntimeError(f"ComfyUI failed the prompt: {data}")
        if event["type"] == "executing" and data.get("node") is None:
            return images


# --- ComfySwap, as a client sees it ---------------------------------------------------------
async def _wrapper_jobs(api_url: str, colours: _Colours, count: int) -> list[Span]:
    spans: list[Span] = []
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as http:
        for _ in range(count):
            started = time.perf_counter()
            created = await http.post(
                "/api/tasks/create",
                json={"workflow": "custom", "task_data": {"wf_json": _graph(colours.take())}},
            )
            created.raise_for_status()
            task_id = created.json()["taskId"]
            while True:
                answer = await http.get(f"/api/tasks/{task_id}", params={"wait": "25"})
                answer.raise_for_status()
                view = answer.json()
                if view["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
                    break
            if view["status"] != "COMPLETED":
                raise RuntimeError(f"task {task_id} ended {view['status']}: {view.get('error')}")
            (await http.get(view["result"]["url"])).raise_for_status()
            spans.append((started, time.perf_counter()))
    return spans


def _durations(spans: list[Span]) -> list[float]:
    return [end - start for start, end in spans]


async def _concurrently(kind: str, url: str, colours: _Colours, total: int) -> float:
    """Jobs per second with CONCURRENCY clients sharing ``total`` jobs, from the first job's
    start to the last one's end: the clients' connects and closes are not jobs (a websocket
    close waiting out its close timeout once cost the floor 10 s of a 1 s round)."""
    each = total // CONCURRENCY
    run = _direct_jobs if kind == "direct" else _wrapper_jobs
    spans = [
        span
        for client in await asyncio.gather(*(run(url, colours, each) for _ in range(CONCURRENCY)))
        for span in client
    ]
    return len(spans) / (max(end for _, end in spans) - min(start for start, _ in spans))


# --- processes ----------------------------------------------------------------------------
@contextlib.contextmanager
def _comfyui(workdir: Path, real: bool) -> Iterator[tuple[ServerProcess, Path]]:
    """The real ComfyUI or the double, each from its one launcher (the peer tier's and the
    fast tiers'), so the benchmark measures the program the tests run; with the folder
    holding its input/ and output/."""
    root = workdir / ("base" if real else "double")
    server = (
        start_real_comfyui(root, log_dir=workdir) if real else comfyui_double.start(root, log_dir=workdir)
    )
    try:
        yield server, root
    finally:
        server.stop()


@contextlib.contextmanager
def _comfyswap(workdir: Path, comfyui_url: str, comfyui_root: Path) -> Iterator[tuple[str, list[int]]]:
    """``comfyswap api`` and ``python -m gpu_runner`` on the embedded store, ComfyUI on the
    same machine as the container co-locates it (its folders known to the runner)."""
    api_port, runner_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    env = {
        "DATA_DIR": str(workdir / "data"),
        "API_PORT": str(api_port),
        "RUNNER_PORT": str(runner_port),
        "TASK_API_URL": f"{api_url}/api",
        "COMFYUI_URL": comfyui_url,
        "COMFYUI_INPUT_DIR": str(comfyui_root / "input"),
        "COMFYUI_OUTPUT_DIR": str(comfyui_root / "output"),
        "RUNNER_ENVIRONMENTS": "comm",
        "ENGINE_SLOTS": str(CONCURRENCY),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO),
        # One tenant sends hundreds of requests a minute and holds 8 long polls at once
        # here; the limits on that are not what this figure measures.
        "RATE_LIMIT_PER_MINUTE": "1000000",
        "RATE_LIMIT_BURST": "100000",
        "MAX_WAITS_PER_TENANT": str(2 * CONCURRENCY),
    }
    api = start_server(
        "api", [PY, "-m", "comfyswap.cli", "api"], url=api_url, log_dir=workdir, env=env,
        health_path="/api/health", timeout_s=60, cwd=REPO,
    )  # fmt: skip
    try:
        runner = start_server(
            "runner", [PY, "-m", "gpu_runner"], url=f"http://127.0.0.1:{runner_port}", log_dir=workdir,
            env=env, health_path="/api/health", timeout_s=90, cwd=REPO,
        )  # fmt: skip
        try:
            yield api_url, [api.pid, runner.pid]
        finally:
            runner.stop()
    finally:
        api.stop()


def _needs(wrapper_budget: float, spend: _Spend) -> str:
    """What 0.8x would take of the API and the runner, or that ComfyUI and the client alone
    already spend more than 0.8x allows on these cores."""
    now_ms = (spend.per_job_s("API") + spend.per_job_s("runner")) * 1000
    if wrapper_budget <= 0:
        return (
            f"0.8x is out of reach here even with a wrapper that costs nothing: ComfyUI and the "
            f"client alone take {-wrapper_budget * 1000:.1f} ms per job more than it allows "
            f"(API + runner now {now_ms:.1f})"
        )
    return f"0.8x needs API + runner <= {wrapper_budget * 1000:.1f} ms per job (now {now_ms:.1f})"


def _rates(rates: list[float]) -> str:
    return " / ".join(f"{rate:.1f}" for rate in rates)


def _on_cpu_ns(pids: list[int]) -> int:
    """Nanoseconds on a CPU so far of every thread of ``pids`` and their children, from
    /proc/<pid>/task/<tid>/schedstat: exact where utime+stime count 10 ms clock ticks,
    which over 10 s of idle cannot tell 0 from 1 ms per second."""
    import psutil

    total = 0
    for pid in pids:
        process = psutil.Process(pid)
        for member in [process, *process.children(recursive=True)]:
            for task in Path(f"/proc/{member.pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    total += int((task / "schedstat").read_text().split()[0])
    return total


class _Spend:
    """CPU per job by process on one side (nanoseconds of every thread, schedstat), and the
    machine's busy cores over the same wall time."""

    PARTS = ("ComfyUI", "client", "API", "runner")

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self._pids = pids
        self.cpu_ns = dict.fromkeys(self.PARTS, 0)
        self.jobs = 0
        self.busy_s = 0.0
        self.wall_s = 0.0

    def _now(self) -> dict[str, int]:
        now = {name: _on_cpu_ns(pids) for name, pids in self._pids.items()}
        now["client"] = time.process_time_ns()  # this process: the benchmark's clients
        return now

    @contextlib.contextmanager
    def jobs_of(self, count: int) -> Iterator[None]:
        before, busy, started = self._now(), machine_busy_s(), time.perf_counter()
        yield
        self.wall_s += time.perf_counter() - started
        self.busy_s += machine_busy_s() - busy
        after = self._now()
        for name in after:
            self.cpu_ns[name] += after[name] - before[name]
        self.jobs += count

    def per_job_s(self, name: str) -> float:
        return self.cpu_ns.get(name, 0) / 1e9 / max(1, self.jobs)

    @property
    def total_per_job_s(self) -> float:
        return sum(self.per_job_s(name) for name in self.PARTS)

    @property
    def cores_busy(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s else 0.0

    def describe(self) -> str:
        measured = [name for name in self.PARTS if name == "client" or name in self._pids]
        parts = " + ".join(f"{name} {self.per_job_s(name) * 1000:.1f}" for name in measured)
        return f"{parts} = {self.total_per_job_s * 1000:.1f} ms"


def _measure(workdir: Path, real: bool, count: int, concurrent_jobs: int) -> list[Row]:
    label = "real ComfyUI 0.3.64 on CPU" if real else "ComfyUI double"
    figure = f"8. ComfyUI path vs direct client ({label}, 64x64 EmptyImage -> ImageInvert -> SaveImage)"
    workdir.mkdir(parents=True, exist_ok=True)
    colours = _Colours()
    with (
        _comfyui(workdir / "comfyui", real) as (comfyui, comfyui_root),
        _comfyswap(workdir / "stack", comfyui.url, comfyui_root) as stack,
    ):
        api_url, pids = stack
        asyncio.run(_direct_jobs(comfyui.url, colours, 3))  # warm-up: first prompts load node code
        asyncio.run(_wrapper_jobs(api_url, colours, 3))
        direct: list[float] = []
        wrapped: list[float] = []
        api_cpu = runner_cpu = 0.0
        # Interleaved batches: drift on a busy machine lands on both sides.
        for _ in range(3):
            direct += _durations(asyncio.run(_direct_jobs(comfyui.url, colours, count // 3)))
            api_before, runner_before = _on_cpu_ns(pids[:1]), _on_cpu_ns(pids[1:])
            wrapped += _durations(asyncio.run(_wrapper_jobs(api_url, colours, count // 3)))
            api_cpu += (_on_cpu_ns(pids[:1]) - api_before) / 1e9
            runner_cpu += (_on_cpu_ns(pids[1:]) - runner_before) / 1e9
        # Interleaved rounds, the best of each side: on a shared machine a round can lose
        # half its rate to someone else's burst; the best round is what each side can do.
        direct_rates: list[float] = []
        wrapped_rates: list[float] = []
        direct_spend = _Spend({"ComfyUI": [comfyui.pid]})
        wrapped_spend = _Spend({"ComfyUI": [comfyui.pid], "API": pids[:1], "runner": pids[1:]})
        for _ in range(CONCURRENT_ROUNDS):
            with direct_spend.jobs_of(concurrent_jobs):
                direct_rates.append(
                    asyncio.run(_concurrently("direct", comfyui.url, colours, concurrent_jobs))
                )
            with wrapped_spend.jobs_of(concurrent_jobs):
                wrapped_rates.append(asyncio.run(_concurrently("wrapper", api_url, colours, concurrent_jobs)))
        direct_rate, wrapped_rate = max(direct_rates), max(wrapped_rates)
        time.sleep(2.0)  # the last answers and log lines settle
        idle_before = _on_cpu_ns(pids)
        time.sleep(10.0)
        idle_ms_per_s = (_on_cpu_ns(pids) - idle_before) / 1e6 / 10.0
    overhead = median(wrapped) - median(direct)
    cpu_per_job = (api_cpu + runner_cpu) / len(wrapped)
    ratio = wrapped_rate / direct_rate
    cores = os.cpu_count() or 1
    # ComfySwap's rate cannot pass the cores over its CPU per job (all of it: ComfyUI, the
    # client, the API, the runner share this machine), so its ratio cannot pass that over
    # the floor's best round; nor the floor's CPU per job over its own, were the floor
    # CPU-bound too. The floor often is not: ComfyUI runs one prompt at a time.
    wrapped_max_rate = cores / wrapped_spend.total_per_job_s
    ceiling = min(
        wrapped_max_rate / direct_rate, direct_spend.total_per_job_s / wrapped_spend.total_per_job_s
    )
    # What 0.8x would need: ComfySwap's whole CPU per job within both bounds at 0.8x, of
    # which ComfyUI and the client take what they take on that side now.
    wrapper_budget = min(
        cores / (THROUGHPUT_TARGET * direct_rate), direct_spend.total_per_job_s / THROUGHPUT_TARGET
    ) - (wrapped_spend.per_job_s("ComfyUI") + wrapped_spend.per_job_s("client"))
    return [
        Row(
            f"{figure}: overhead per job, median of {len(wrapped)}",
            f"{overhead * 1000:+.1f} ms (ComfySwap {fmt_ms(median(wrapped))})",
            f"<= +{OVERHEAD_TARGET_S * 1000:.0f} ms",
            f"direct client: {fmt_ms(median(direct))}",
            "meets" if overhead <= OVERHEAD_TARGET_S else "MISSES",
        ),
        Row(
            f"{figure}: throughput, {CONCURRENCY} concurrent clients, {concurrent_jobs} jobs, "
            f"best of {CONCURRENT_ROUNDS} interleaved rounds",
            f"{wrapped_rate:.1f} jobs/s = {ratio:.2f}x direct (rounds: {_rates(wrapped_rates)})",
            f">= {THROUGHPUT_TARGET}x direct",
            f"direct client: {direct_rate:.1f} jobs/s (rounds: {_rates(direct_rates)})",
            "meets" if ratio >= THROUGHPUT_TARGET else "MISSES",
        ),
        Row(
            f"{figure}: CPU per job during the {CONCURRENCY}-client rounds, every process "
            f"(schedstat), and the throughput ceiling it implies on {cores} cores",
            f"ComfySwap: {wrapped_spend.describe()} (at most {wrapped_max_rate:.0f} jobs/s on "
            f"{cores} cores), {wrapped_spend.cores_busy:.1f} of {cores} cores busy; ceiling "
            f"{ceiling:.2f}x direct (measured {ratio:.2f}x); {_needs(wrapper_budget, wrapped_spend)}",
            "counted",
            f"direct client: {direct_spend.describe()}, {direct_spend.cores_busy:.1f} of {cores} cores busy "
            "(cores busy: /proc/stat over each round, its clients' connects and closes included)",
            "info",
        ),
        Row(
            f"{figure}: wrapper CPU per job (API + runner processes, the sequential jobs)",
            f"{fmt_ms(cpu_per_job)} (API {api_cpu / len(wrapped) * 1000:.1f} + runner "
            f"{runner_cpu / len(wrapped) * 1000:.1f})",
            f"<= {fmt_ms(CPU_PER_JOB_TARGET_S)}",
            "direct client: none (the floor)",
            "meets" if cpu_per_job <= CPU_PER_JOB_TARGET_S else "MISSES",
        ),
        Row(
            f"{figure}: CPU at idle, API + runner over 10 s (every thread's schedstat)",
            f"{idle_ms_per_s:.2f} ms per second",
            f"< {IDLE_TARGET_MS_PER_S:.0f} ms per second",
            "direct client: none (the floor)",
            "meets" if idle_ms_per_s < IDLE_TARGET_MS_PER_S else "MISSES",
        ),
    ]


def comfyui_floor_rows(workdir: Path, *, count: int = 30, concurrent_jobs: int = 64) -> list[Row]:
    rows: list[Row] = []
    if comfyui_peer.installed():
        try:
            rows += _measure(workdir / "real", True, count, concurrent_jobs)
        except Exception as exc:
            rows.append(failed("8. ComfyUI path vs direct client (real ComfyUI)", exc))
    else:
        rows.append(
            not_measured("8. ComfyUI path vs direct client (real ComfyUI)", comfyui_peer.missing_reason())
        )
    try:
        rows += _measure(workdir / "double", False, count, concurrent_jobs)
    except Exception as exc:
        rows.append(failed("8. ComfyUI path vs direct client (double)", exc))
    return rows
