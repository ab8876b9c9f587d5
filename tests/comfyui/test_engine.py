"""ComfyUIEngine / ComfyUIClient against the ComfyUI double, one recorded scenario per test.

Scenario ids (s02, s04, ...) are those of docs/comfyui-protocol.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from gpu_runner.engines.base import EngineResult
from gpu_runner.engines.comfyui import (
    ComfyUIEngine,
    OutputFile,
    _take_local_output,
    comfyui_input_dir,
    comfyui_output_dir,
)
from gpu_runner.engines.comfyui_errors import scrub_all
from shared.errors import JobCancelled, JobFailed, UpstreamUnavailable
from shared.settings import Settings
from shared.tasks import Progress, Task
from shared.workflows import build_input_data
from tests.comfyui.conftest import (
    WORKFLOWS,
    load_workflow,
    make_client,
    make_engine,
    make_task,
    png_bytes,
    serve_image,
    start_double,
)
from tests.servers import ServerProcess, free_port


async def _run_job(
    engine: ComfyUIEngine,
    task: Task,
    workdir: Path,
    *,
    cancel: asyncio.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> EngineResult:
    try:
        job = await engine.prepare(task, workdir)
        return await engine.run(job, on_progress or (lambda _: None), cancel or asyncio.Event())
    finally:
        await engine.close()


def run_job(engine: ComfyUIEngine, task: Task, workdir: Path, **kwargs: Any) -> EngineResult:
    return asyncio.run(_run_job(engine, task, workdir, **kwargs))


def hook(double: ServerProcess, name: str, **body: Any) -> None:
    httpx.post(f"{double.url}/__double__/{name}", json=body, timeout=10).raise_for_status()


def test_normal_run_inverts_the_uploaded_image(comfyui_double, input_server, tmp_path):
    # s02: LoadImage -> Invert -> Scale(128x96) -> Save, with the input fetched, uploaded and wired in.
    url = serve_image(input_server, png_bytes(96, 64, (0, 0, 40)))
    task = make_task(
        {
            "wf_json": load_workflow("load_invert_scale_save"),
            "image_inputs": [{"param": "image_url", "node": "1", "input": "image", "url": url}],
        }
    )
    seen: list[Progress] = []

    result = run_job(make_engine(comfyui_double.url), task, tmp_path, on_progress=seen.append)

    assert len(result.outputs) == 1
    output = result.outputs[0]
    assert (output.node_id, output.content_type, output.kind) == ("4", "image/png", "image")
    assert (output.width, output.height) == (128, 96)
    with Image.open(output.path) as picture:
        assert picture.convert("RGB").getpixel((0, 0)) == (255, 255, 215)
    assert output.extra["subfolder"] == "probe"
    assert seen
    assert seen[-1].value == seen[-1].max == 4
    assert [p.value for p in seen] == sorted(p.value for p in seen)


def test_upload_is_renamed_and_the_returned_name_is_used(comfyui_double, tmp_path):
    # s01: same name, different bytes -> "name (1).png"; the client must use what comes back.
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(png_bytes(8, 8, (1, 2, 3)))
    second.write_bytes(png_bytes(8, 8, (4, 5, 6)))

    async def scenario() -> tuple[str, str, str]:
        async with make_client(comfyui_double.url) as client:
            a = await client.upload_image(first, name="same.png", subfolder="t")
            b = await client.upload_image(second, name="same.png", subfolder="t")
            return a.load_image_value, b.load_image_value, b.name

    a_value, b_value, b_name = asyncio.run(scenario())

    assert a_value == "t/same.png"
    assert b_value == "t/same (1).png"
    assert b_name == "same (1).png"


def test_fully_cached_rerun_returns_the_old_files(comfyui_double, tmp_path):
    # s02: the same workflow again: execution_cached with every node, no executing{node},
    # executed replayed with the OLD file names, which are still valid downloads.
    workflow = load_workflow("empty_save")

    async def scenario() -> tuple[Any, Any]:
        async with make_client(comfyui_double.url) as client:
            return await client.run_prompt(workflow), await client.run_prompt(workflow)

    first, second = asyncio.run(scenario())

    assert first.cached_nodes == []
    assert second.cached_nodes == ["1", "2"]
    assert [f.filename for f in second.files()] == [f.filename for f in first.files()]
    result = run_job(make_engine(comfyui_double.url), make_task({"wf_json": workflow}), tmp_path)
    assert result.metadata["cached_nodes"] == ["1", "2"]
    assert result.outputs[0].path.stat().st_size > 0


def test_multi_output_lists_every_file_with_its_node_and_the_text(comfyui_double, tmp_path):
    # s04: two SaveImage, a PreviewImage (temp) and PreviewAny, batch of 2.
    task = make_task({"wf_json": load_workflow("multi_output")})

    result = run_job(make_engine(comfyui_double.url), task, tmp_path)

    by_node: dict[str, list[Any]] = {}
    for output in result.outputs:
        by_node.setdefault(output.node_id or "", []).append(output)
    assert sorted(by_node) == ["2", "4", "5", "7"]
    assert all(len(by_node[node]) == 2 for node in ("2", "4", "5"))
    # PreviewAny's text is an output like the files (a text-only graph is not `no_output`).
    assert [(o.kind, o.path.read_text()) for o in by_node["7"]] == [("text", "32")]
    assert {o.extra["type"] for o in by_node["5"]} == {"temp"}
    with Image.open(by_node["4"][0].path) as picture:
        assert picture.size == (32, 16)
        assert picture.convert("RGB").getpixel((0, 0)) == (255, 0, 255)
    assert "comfyui_outputs" not in result.metadata  # each output described once, in outputs


def test_save_image_websocket_frames_become_outputs(comfyui_double, tmp_path):
    # s05: SaveImageWebsocket has no executed/outputs; its images only arrive as binary frames.
    result = run_job(
        make_engine(comfyui_double.url), make_task({"wf_json": load_workflow("ws_save")}), tmp_path
    )

    assert len(result.outputs) == 3
    assert {(o.node_id, o.width, o.height, o.extra["source"]) for o in result.outputs} == {
        ("2", 48, 40, "websocket")
    }


INVALID_CASES = sorted(path.stem for path in (WORKFLOWS / "invalid").glob("*.json"))


@pytest.mark.parametrize("case", INVALID_CASES)
def test_every_recorded_validation_error_is_a_useful_job_failure(comfyui_double, tmp_path, case):
    recorded = json.loads((WORKFLOWS / "invalid" / f"{case}.json").read_text())
    prompt = recorded["request_body"]["prompt"]
    task = make_task({"wf_json": prompt})

    def attempt() -> None:
        if isinstance(prompt, dict) and prompt:
            asyncio.run(_run_prompt(comfyui_double.url, prompt))
        else:  # a list, a string, {}: refused before anything is posted
            run_job(make_engine(comfyui_double.url), task, tmp_path)

    with pytest.raises(JobFailed) as caught:
        attempt()

    error = caught.value
    assert not error.retryable
    if not (isinstance(prompt, dict) and prompt):
        assert error.code == "comfyui_no_workflow"
        return
    assert error.code == "comfyui_validation_failed"
    expected = recorded["expect_body"] or {}
    for node_id, node_error in (expected.get("node_errors") or {}).items():
        assert f"node {node_id} ({node_error['class_type']})" in error.message
        for problem in node_error["errors"]:
            input_name = problem["extra_info"].get("input_name")
            if input_name:
                assert repr(input_name) in error.message
    if expected.get("error") and not expected.get("node_errors"):
        assert expected["error"]["message"] in error.message
    if recorded["expect_status"] == 400:
        # ComfyUI's answer as it came, less what clients must not see (tracebacks, paths).
        assert error.details["upstream_body"] == scrub_all(expected)
        assert "traceback" not in json.dumps(error.details)


async def _run_prompt(url: str, prompt: dict[str, Any]) -> Any:
    async with make_client(url) as client:
        return await client.run_prompt(prompt)


def test_partially_valid_prompt_is_an_error_and_does_not_run(comfyui_double):
    # A 200 with node_errors: ComfyUI queued the valid half; the client must stop it.
    recorded = json.loads(
        (WORKFLOWS / "invalid" / "valid_output_node_one_broken_output_node.json").read_text()
    )
    hook(comfyui_double, "node_delay", class_type="ImageInvert", seconds=0.5)

    with pytest.raises(JobFailed) as caught:
        asyncio.run(_run_prompt(comfyui_double.url, recorded["request_body"]["prompt"]))

    assert caught.value.code == "comfyui_validation_failed"
    assert "node 5 (SaveImage)" in caught.value.message
    assert "node 77" in caught.value.message
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        history = httpx.get(comfyui_double.url + "/history", timeout=5).json()
        if history:
            break
        time.sleep(0.05)
    statuses = [entry["status"]["status_str"] for entry in history.values()]
    assert statuses in ([], ["error"])  # deleted while pending, or interrupted: never a success


def test_corrupt_input_image_is_an_execution_error_naming_the_node(comfyui_double, tmp_path):
    # s07: upload accepts text bytes named .png; LoadImage fails at run time.
    (tmp_path / "bad.png").write_bytes(b"this is not an image")

    async def scenario() -> None:
        async with make_client(comfyui_double.url) as client:
            uploaded = await client.upload_image(tmp_path / "bad.png", name="not_an_image.png")
            await client.run_prompt(load_workflow("exec_error_corrupt_image") | {})
            assert uploaded.name == "not_an_image.png"

    with pytest.raises(JobFailed) as caught:
        asyncio.run(scenario())

    error = caught.value
    assert error.code == "comfyui_execution_error"
    assert error.details["node_id"] == "1"
    assert error.details["node_type"] == "LoadImage"
    assert error.details["exception_type"] == "PIL.UnidentifiedImageError"
    assert "node 1 (LoadImage)" in error.message
    assert "cannot identify image file" in error.message


def test_cancel_interrupts_the_running_prompt_and_the_next_one_runs(comfyui_double, tmp_path):
    # s08: interrupt by prompt_id takes effect at the next node boundary.
    hook(comfyui_double, "node_delay", class_type="ImageBlur", seconds=0.6)
    engine = make_engine(comfyui_double.url)
    cancel = asyncio.Event()

    def on_progress(progress: Progress) -> None:
        if "ImageBlur" in progress.stage:
            cancel.set()

    started = time.monotonic()
    with pytest.raises(JobCancelled) as caught:
        run_job(
            engine,
            make_task({"wf_json": load_workflow("slow_blur")}),
            tmp_path,
            cancel=cancel,
            on_progress=on_progress,
        )

    assert caught.value.code == "cancelled"
    assert time.monotonic() - started < 4
    prompt_id = caught.value.details["prompt_id"]
    entry = httpx.get(f"{comfyui_double.url}/history/{prompt_id}", timeout=5).json()[prompt_id]
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    follow_up = run_job(
        make_engine(comfyui_double.url), make_task({"wf_json": load_workflow("empty_save")}), tmp_path
    )
    assert len(follow_up.outputs) == 1


@pytest.mark.parametrize("stop", ["cancel", "timeout", "validation"])
def test_a_prompt_stopped_as_it_starts_does_not_run_to_its_end(comfyui_double, tmp_path, stop):
    """ComfyUI clears its interrupt flag when a prompt starts executing: an interrupt sent
    after the prompt left the queue but before it started is lost, and the prompt would run
    to its end (and save its outputs) for a job that already failed or was cancelled."""
    hook(comfyui_double, "start_delay", seconds=1.0)
    hook(comfyui_double, "node_delay", class_type="ImageBlur", seconds=0.3)
    hook(comfyui_double, "node_delay", class_type="ImageInvert", seconds=0.3)
    cancel = asyncio.Event()

    async def cancel_once_running() -> None:
        while not (await asyncio.to_thread(httpx.get, comfyui_double.url + "/queue", timeout=5)).json()[
            "queue_running"
        ]:
            await asyncio.sleep(0.02)
        cancel.set()  # inside the 1 s between leaving the queue and starting

    async def scenario() -> None:
        if stop == "validation":
            recorded = json.loads(
                (WORKFLOWS / "invalid" / "valid_output_node_one_broken_output_node.json").read_text()
            )
            await _run_prompt(comfyui_double.url, recorded["request_body"]["prompt"])
            return
        engine = make_engine(comfyui_double.url, task_timeout_s=0.5 if stop == "timeout" else 30.0)
        canceller = asyncio.create_task(cancel_once_running()) if stop == "cancel" else None
        try:
            await _run_job(
                engine, make_task({"wf_json": load_workflow("slow_blur")}), tmp_path, cancel=cancel
            )
        finally:
            if canceller is not None:
                canceller.cancel()

    with pytest.raises((JobCancelled, JobFailed)):
        asyncio.run(scenario())

    deadline = time.monotonic() + 30
    history: dict[str, Any] = {}
    while time.monotonic() < deadline:
        queue = httpx.get(comfyui_double.url + "/queue", timeout=5).json()
        history = httpx.get(comfyui_double.url + "/history", timeout=5).json()
        if history and not queue["queue_running"] and not queue["queue_pending"]:
            break
        time.sleep(0.05)
    statuses = [entry["status"]["status_str"] for entry in history.values()]
    assert statuses == ["error"], statuses  # interrupted, never run to success
    messages = [entry["status"]["messages"][-1][0] for entry in history.values()]
    assert messages == ["execution_interrupted"], messages


def test_cancel_while_pending_deletes_it_from_the_queue(comfyui_double, tmp_path):
    hook(comfyui_double, "node_delay", class_type="ImageBlur", seconds=0.5)
    blocker = httpx.post(
        comfyui_double.url + "/prompt", json={"prompt": load_workflow("slow_blur")}, timeout=5
    )
    cancel = asyncio.Event()

    async def scenario() -> None:
        engine = make_engine(comfyui_double.url)
        task = asyncio.create_task(
            _run_job(engine, make_task({"wf_json": load_workflow("empty_save")}), tmp_path, cancel=cancel)
        )
        deadline = time.monotonic() + 10
        while not (await asyncio.to_thread(httpx.get, comfyui_double.url + "/queue", timeout=5)).json()[
            "queue_pending"
        ]:
            # Never "nothing happened": the cancel must find our prompt pending, not absent.
            assert time.monotonic() < deadline, "the task's prompt never reached the queue"
            await asyncio.sleep(0.02)
        cancel.set()
        await task

    with pytest.raises(JobCancelled) as caught:
        asyncio.run(scenario())

    prompt_id = caught.value.details["prompt_id"]
    queue = httpx.get(comfyui_double.url + "/queue", timeout=5).json()
    assert prompt_id not in json.dumps(queue)
    assert httpx.get(f"{comfyui_double.url}/history/{prompt_id}", timeout=5).json() == {}  # it never ran
    httpx.post(comfyui_double.url + "/interrupt", json={"prompt_id": blocker.json()["prompt_id"]}, timeout=5)


def test_socket_dropped_mid_run_still_completes_from_history(comfyui_double, tmp_path):
    # s10/s11: events sent while the socket is down are lost; /history has the result.
    hook(comfyui_double, "node_delay", class_type="ImageBlur", seconds=0.2)
    hook(comfyui_double, "drop_sockets", at_node="4", refuse_s=2.0)

    result = run_job(
        make_engine(comfyui_double.url), make_task({"wf_json": load_workflow("slow_blur")}), tmp_path
    )

    assert result.metadata["completed_via"] == "history"
    assert [(o.node_id, o.width) for o in result.outputs] == [("6", 1024), ("6", 1024)]


def test_socket_dropped_and_reconnected_completes(comfyui_double, tmp_path):
    hook(comfyui_double, "node_delay", class_type="ImageBlur", seconds=0.2)
    hook(comfyui_double, "drop_sockets", at_node="3")

    result = run_job(
        make_engine(comfyui_double.url), make_task({"wf_json": load_workflow("slow_blur")}), tmp_path
    )

    assert result.metadata["socket_drops"] >= 1
    assert len(result.outputs) == 2


def test_stalled_history_does_not_delay_a_websocket_completion(comfyui_double, tmp_path):
    hook(comfyui_double, "stall_history", seconds=20)
    started = time.monotonic()

    result = run_job(
        make_engine(comfyui_double.url), make_task({"wf_json": load_workflow("empty_save")}), tmp_path
    )

    assert result.metadata["completed_via"] == "websocket"
    assert time.monotonic() - started < 5


def test_comfyui_killed_mid_run_is_retryable_upstream_unavailable(tmp_path):
    double = start_double(tmp_path, "comfyui-doomed")
    try:
        hook(double, "node_delay", class_type="ImageBlur", seconds=0.3)
        hook(double, "crash", at_node="4")
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable) as caught:
            run_job(make_engine(double.url), make_task({"wf_json": load_workflow("slow_blur")}), tmp_path)
    finally:
        double.stop()

    assert caught.value.code == "comfyui_unavailable"
    assert caught.value.retryable
    assert time.monotonic() - started < 10


def test_comfyui_restarted_mid_run_holds_the_task_and_runs_it_again(tmp_path):
    # A crash is not the task's fault: held until ComfyUI answers again, then run once more.
    port = free_port()
    doubles = [start_double(tmp_path, "comfyui-restarting", port=port)]
    try:
        hook(doubles[0], "node_delay", class_type="ImageBlur", seconds=0.3)
        hook(doubles[0], "crash", at_node="4")

        async def scenario() -> EngineResult:
            engine = make_engine(doubles[0].url, restart_wait_s=60.0)
            job = asyncio.create_task(
                _run_job(engine, make_task({"wf_json": load_workflow("slow_blur")}), tmp_path)
            )
            while doubles[0].alive():
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # down for a while, as a real restart is
            doubles.append(await asyncio.to_thread(start_double, tmp_path, "comfyui-restarted", port))
            return await job

        result = asyncio.run(scenario())
    finally:
        for double in doubles:
            double.stop()

    assert len(result.outputs) == 2
    assert result.metadata["comfyui_held"]["times"] == 1


def test_a_5xx_from_queue_while_polling_is_retryable_not_an_internal_error(comfyui_double, tmp_path):
    # The history poll asks /queue when /history has nothing yet; a 500 there used to escape
    # as httpx.HTTPStatusError (runner_internal_error).
    hook(comfyui_double, "node_delay", class_type="ImageBlur", seconds=2.0)
    hook(comfyui_double, "drop_sockets", at_node="3", refuse_s=30.0)
    hook(comfyui_double, "fail_queue", status=500)

    with pytest.raises(UpstreamUnavailable) as caught:
        run_job(make_engine(comfyui_double.url), make_task({"wf_json": load_workflow("slow_blur")}), tmp_path)

    assert caught.value.code == "comfyui_unavailable"
    assert "GET /queue answered HTTP 500" in caught.value.message


def test_a_5xx_from_queue_while_cancelling_still_cancels(comfyui_double, tmp_path):
    hook(comfyui_double, "node_delay", class_type="ImageBlur", seconds=1.0)
    cancel = asyncio.Event()

    def on_progress(progress: Progress) -> None:
        if "ImageBlur" in progress.stage and not cancel.is_set():
            httpx.post(f"{comfyui_double.url}/__double__/fail_queue", json={"status": 503}, timeout=5)
            cancel.set()

    with pytest.raises(JobCancelled):
        run_job(
            make_engine(comfyui_double.url),
            make_task({"wf_json": load_workflow("slow_blur")}),
            tmp_path,
            cancel=cancel,
            on_progress=on_progress,
        )


def test_comfyui_not_listening_is_upstream_unavailable_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()

    with pytest.raises(UpstreamUnavailable) as caught:
        run_job(make_engine(url), make_task({"wf_json": load_workflow("empty_save")}), tmp_path)

    assert caught.value.retryable
    assert caught.value.code == "comfyui_unavailable"
    assert time.monotonic() - started < 5


def test_not_configured_fails_fast_naming_the_setting(tmp_path):
    engine = ComfyUIEngine(Settings(comfyui_url=""), fetcher=None)
    started = time.monotonic()

    with pytest.raises(JobFailed) as caught:
        run_job(engine, make_task({"wf_json": load_workflow("empty_save")}), tmp_path)

    assert caught.value.code == "comfyui_not_configured"
    assert "COMFYUI_URL" in caught.value.message
    assert time.monotonic() - started < 1
    assert asyncio.run(engine.health())["status"] == "not_configured"


def test_basic_generation_template_end_to_end_with_progress(comfyui_double, tmp_path):
    # The stand-in model nodes: KSampler reports progress per step.
    input_data = build_input_data(
        "basic_generation",
        {"prompt": "a red fox", "steps": 6, "width": 96, "height": 64, "seed": 7, "batch_size": 2},
        allow_raw=False,
    )
    seen: list[Progress] = []

    result = run_job(
        make_engine(comfyui_double.url),
        make_task(input_data, "basic_generation"),
        tmp_path,
        on_progress=seen.append,
    )

    assert [(o.node_id, o.width, o.height) for o in result.outputs] == [("9", 96, 64), ("9", 96, 64)]
    values = [p.value for p in seen]
    assert values == sorted(values)
    assert values[-1] == seen[-1].max == 7
    assert any("KSampler" in p.stage and not float(p.value).is_integer() for p in seen)


def test_invert_image_template_fetches_uploads_and_wires_the_input(comfyui_double, input_server, tmp_path):
    url = serve_image(input_server, png_bytes(20, 10, (10, 200, 30)))
    input_data = build_input_data(
        "invert_image", {"image_url": url, "width": 40, "height": 20}, allow_raw=False
    )
    engine = make_engine(comfyui_double.url)

    result = run_job(engine, make_task(input_data, "invert_image"), tmp_path)

    assert engine.fetcher is not None
    assert engine.fetcher.fetched == [url]
    with Image.open(result.outputs[0].path) as picture:
        assert picture.size == (40, 20)
        assert picture.convert("RGB").getpixel((5, 5)) == (245, 55, 225)


def test_runner_route_helpers(comfyui_double):
    engine = make_engine(comfyui_double.url)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        try:
            await engine.interrupt(None)
            return await engine.health(), await engine.queue_status(), await engine.system_stats()
        finally:
            await engine.close()

    health, queue, stats = asyncio.run(scenario())

    assert health["status"] == "available"
    assert health["comfyui_version"] == "0.3.64"
    assert queue == {"running": [], "pending": [], "queue_remaining": 0}
    assert stats["devices"][0]["name"] == "cpu"


@pytest.mark.parametrize(
    ("settings", "expected_input", "expected_output"),
    [
        ({"comfyui_input_dir": "/data/in", "comfyui_output_dir": "/data/out"}, "/data/in", "/data/out"),
        (
            {
                "comfyui_command": "python /opt/ComfyUI/main.py --input-directory /srv/in "
                "--output-directory /srv/out"
            },
            "/srv/in",
            "/srv/out",
        ),
        (
            {"comfyui_command": "python /opt/ComfyUI/main.py --base-directory /srv/comfy"},
            "/srv/comfy/input",
            "/srv/comfy/output",
        ),
        (
            {"comfyui_command": "python /opt/ComfyUI/main.py --listen 127.0.0.1"},
            "/opt/ComfyUI/input",
            "/opt/ComfyUI/output",
        ),
        ({"comfyui_command": "python main.py"}, None, None),
        ({}, None, None),
    ],
)
def test_the_folders_of_the_supervised_comfyui_come_from_the_settings_or_its_command(
    settings, expected_input, expected_output
):
    # The container sets COMFYUI_COMMAND only: the folders its ComfyUI reads inputs from
    # (a task's uploads are removed there) and saves outputs to (taken from there).
    found = [comfyui_input_dir(Settings(**settings)), comfyui_output_dir(Settings(**settings))]

    assert [str(path) if path is not None else None for path in found] == [expected_input, expected_output]


def test_outputs_of_a_comfyui_on_this_machine_are_taken_from_its_folder_not_downloaded(tmp_path):
    # Co-located (the container's case): the saved file is hard-linked from ComfyUI's output
    # folder, the same inode, where a download through GET /view would write a new file.
    double = start_double(tmp_path, name="local-outputs")
    try:
        output_dir = tmp_path / "local-outputs-root" / "output"
        settings = Settings(comfyui_url=double.url, comfyui_output_dir=str(output_dir))
        engine = ComfyUIEngine(settings, None, client=make_client(double.url))
        task = make_task({"wf_json": load_workflow("empty_save")})

        result = run_job(engine, task, tmp_path / "work")
    finally:
        double.stop()

    [output] = result.outputs
    source = output_dir / output.extra["subfolder"] / output.extra["filename"]
    assert output.path.stat().st_ino == source.stat().st_ino
    assert (output.content_type, output.kind, output.node_id) == ("image/png", "image", "2")
    assert (output.width, output.height) == Image.open(source).size


def test_an_output_outside_the_local_folder_is_never_taken_from_disk(tmp_path):
    # Whatever ComfyUI reports (a subfolder of "..", a symlink in its folder), only files
    # inside its output folder are read; anything else goes through /view (and fails there).
    root = tmp_path / "output"
    root.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(4, 4, (9, 9, 9)))
    (root / "link.png").symlink_to(secret)

    escaped = _take_local_output(
        root, OutputFile("9", "images", "secret.png", "..", "output"), tmp_path / "a"
    )
    linked = _take_local_output(root, OutputFile("9", "images", "link.png", "", "output"), tmp_path / "b")

    assert escaped is None and linked is None
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
