"""The ComfyUI engine against the real ComfyUI 0.3.64 (CPU): every scenario of tests/comfyui
that the real server can play (the double alone plays socket drops and stalled routes),
the three templates, and the defects the real server showed (issue 11).

Graphs use only model-free nodes; each test varies a colour or a size so ComfyUI's cache
(which keeps the previous prompt's results) never answers for it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from gpu_runner.engines.base import EngineResult
from gpu_runner.engines.comfyui import ComfyUIClient, ComfyUIEngine
from shared.errors import JobCancelled, JobFailed
from shared.settings import Settings
from shared.tasks import Progress, Task
from shared.workflows import build_input_data
from tests.comfyui.conftest import WORKFLOWS, LoopbackFetcher, load_workflow, make_task, png_bytes
from tests.peers.conftest import RealComfyUI
from tests.servers import MediaServer, wait_until

pytestmark = pytest.mark.real_peer("comfyui")

ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]+")


def blur_chain(links: int, *, size: int = 512, radius: int = 8) -> dict[str, Any]:
    """EmptyImage -> ``links`` x ImageBlur -> SaveImage: slow in steps of one blur (about 0.4 s
    at 512 px on two cores), so an interrupt (checked between nodes) lands within one step.
    Past a few hundred nodes ComfyUI itself slows down per node: keep chains at 100 or less."""
    graph: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": random.randrange(1 << 24)},
        }
    }
    for index in range(links):
        graph[str(index + 2)] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [str(index + 1), 0], "blur_radius": radius, "sigma": 3.0},
        }
    graph["save"] = {
        "class_type": "SaveImage",
        "inputs": {"images": [str(links + 1), 0], "filename_prefix": "chain"},
    }
    return graph


def invert_own_image(image_url: str, *, prefix: str = "custom") -> dict[str, Any]:
    """The `custom` workflow's task_data for a raw graph that brings its own input image:
    LoadImage (given image_url, fetched and uploaded by the runner) -> ImageInvert -> SaveImage."""
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }
    return {"wf_json": graph, "image_inputs": [{"node": "1", "input": "image", "url": image_url}]}


def near(pixel: Any, expected: tuple[int, int, int]) -> bool:
    """ComfyUI inverts in float32 (1 - x) and rounds down when it saves: off by one at most."""
    return all(abs(int(a) - b) <= 1 for a, b in zip(pixel, expected, strict=True))


def fresh(workflow: dict[str, Any]) -> dict[str, Any]:
    """``workflow`` with its EmptyImage colours changed: never a cache hit."""
    for node in workflow.values():
        if node["class_type"] == "EmptyImage":
            node["inputs"]["color"] = random.randrange(1 << 24)
    return workflow


def engine_for(comfyui: RealComfyUI, **settings: Any) -> ComfyUIEngine:
    options: dict[str, Any] = {
        "comfyui_url": comfyui.url,
        "comfyui_input_dir": str(comfyui.input_dir),
        "task_timeout_s": 120.0,
        "comfyui_restart_wait_s": 0.0,
        **settings,
    }
    client = ComfyUIClient(
        comfyui.url, client_id=f"peer-test-{uuid.uuid4().hex[:8]}", history_poll_interval_s=0.5
    )
    return ComfyUIEngine(Settings(**options), LoopbackFetcher(), client=client)


async def _run(
    engine: ComfyUIEngine, task: Task, workdir: Path, cancel: asyncio.Event | None, seen: list[Progress]
) -> EngineResult:
    try:
        job = await engine.prepare(task, workdir)
        return await engine.run(job, seen.append, cancel or asyncio.Event())
    finally:
        await engine.close()


def run_job(
    engine: ComfyUIEngine,
    task: Task,
    workdir: Path,
    *,
    cancel: asyncio.Event | None = None,
    seen: list[Progress] | None = None,
) -> EngineResult:
    return asyncio.run(_run(engine, task, workdir, cancel, seen if seen is not None else []))


def queue(comfyui: RealComfyUI) -> dict[str, Any]:
    return dict(httpx.get(comfyui.url + "/queue", timeout=10).json())


@pytest.fixture(scope="module")
def media() -> Any:
    with MediaServer().running() as server:
        yield server


def test_uploaded_input_is_inverted_scaled_and_removed_from_comfyui_input_folder(
    comfyui_idle, media, tmp_path
):
    # s02: LoadImage -> ImageInvert -> ImageScale(128x96) -> SaveImage, the input fetched and uploaded.
    url = media.add(f"/{uuid.uuid4().hex}.png", "image/png", png_bytes(96, 64, (0, 0, 40)))
    task = make_task(
        {
            "wf_json": load_workflow("load_invert_scale_save"),
            "image_inputs": [{"param": "image_url", "node": "1", "input": "image", "url": url}],
        }
    )
    seen: list[Progress] = []

    result = run_job(engine_for(comfyui_idle), task, tmp_path, seen=seen)

    output = result.outputs[0]
    assert (output.node_id, output.content_type, output.kind) == ("4", "image/png", "image")
    assert (output.width, output.height) == (128, 96)
    with Image.open(output.path) as picture:
        assert near(picture.convert("RGB").getpixel((0, 0)), (255, 255, 215))
    assert output.extra["output_key"] == "images" and output.extra["type"] == "output"
    # Progress came from the real server's events, node by node, up to the end.
    assert seen and seen[-1].value == seen[-1].max == 4
    assert [p.value for p in seen] == sorted(p.value for p in seen)
    # The upload went to input/comfyswap/ and is gone once the task ended.
    assert (comfyui_idle.input_dir / "comfyswap").is_dir()
    assert list((comfyui_idle.input_dir / "comfyswap").iterdir()) == []


def test_upload_of_a_clashing_name_is_renamed_and_the_returned_name_is_used(comfyui_idle, tmp_path):
    # s01: same name, different bytes -> "name (1).png".
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(png_bytes(8, 8, (1, 2, 3)))
    second.write_bytes(png_bytes(8, 8, (4, 5, 6)))
    name = f"same-{uuid.uuid4().hex[:6]}.png"

    async def scenario() -> tuple[str, str]:
        async with ComfyUIClient(comfyui_idle.url) as client:
            a = await client.upload_image(first, name=name, subfolder="t")
            b = await client.upload_image(second, name=name, subfolder="t")
            return a.load_image_value, b.load_image_value

    a_value, b_value = asyncio.run(scenario())

    assert a_value == f"t/{name}"
    assert b_value == f"t/{name.removesuffix('.png')} (1).png"


def test_fully_cached_rerun_returns_the_old_files(comfyui_idle, tmp_path):
    workflow = fresh(load_workflow("empty_save"))

    async def scenario() -> tuple[Any, Any]:
        async with ComfyUIClient(comfyui_idle.url) as client:
            return await client.run_prompt(workflow), await client.run_prompt(workflow)

    first, second = asyncio.run(scenario())

    assert first.cached_nodes == []
    assert sorted(second.cached_nodes) == sorted(workflow)
    assert [f.filename for f in second.files()] == [f.filename for f in first.files()]


def test_multi_output_lists_every_file_and_the_text_each_once(comfyui_idle, tmp_path):
    # s04: two SaveImage, a PreviewImage (temp) and PreviewAny, batch of 2.
    result = run_job(
        engine_for(comfyui_idle), make_task({"wf_json": fresh(load_workflow("multi_output"))}), tmp_path
    )

    by_node: dict[str, list[Any]] = {}
    for output in result.outputs:
        by_node.setdefault(output.node_id or "", []).append(output)
    assert sorted(by_node) == ["2", "4", "5", "7"]
    assert all(len(by_node[node]) == 2 for node in ("2", "4", "5"))
    assert {o.extra["type"] for o in by_node["5"]} == {"temp"}
    text = by_node["7"]
    assert [(o.kind, o.content_type, o.path.read_text()) for o in text] == [("text", "text/plain", "32")]
    # One description per output: nothing of ComfyUI's raw answer repeated in the metadata.
    assert "comfyui_outputs" not in result.metadata


def test_text_only_graph_has_its_text_as_the_output(comfyui_idle, tmp_path):
    # GetImageSize -> PreviewAny: ComfyUI succeeds with text and no file.
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 72, "height": 24, "batch_size": 1, "color": 5}},
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    fresh(graph)

    result = run_job(engine_for(comfyui_idle), make_task({"wf_json": graph}), tmp_path)

    assert [(o.node_id, o.kind, o.path.read_text()) for o in result.outputs] == [("3", "text", "72")]


def test_save_image_websocket_frames_become_outputs(comfyui_idle, tmp_path):
    # s05: no executed/outputs; the images only arrive as binary frames.
    result = run_job(
        engine_for(comfyui_idle), make_task({"wf_json": fresh(load_workflow("ws_save"))}), tmp_path
    )

    assert len(result.outputs) == 3
    assert {(o.node_id, o.width, o.height, o.extra["source"]) for o in result.outputs} == {
        ("2", 48, 40, "websocket")
    }


def _reaches_the_server(case: str) -> bool:
    prompt = json.loads((WORKFLOWS / "invalid" / f"{case}.json").read_text())["request_body"]["prompt"]
    return isinstance(prompt, dict) and bool(prompt)  # the client refuses the others itself


INVALID_CASES = sorted(
    path.stem for path in (WORKFLOWS / "invalid").glob("*.json") if _reaches_the_server(path.stem)
)


@pytest.mark.parametrize("case", INVALID_CASES)
def test_every_recorded_validation_error_is_a_useful_job_failure_without_server_paths(comfyui_idle, case):
    recorded = json.loads((WORKFLOWS / "invalid" / f"{case}.json").read_text())
    prompt = recorded["request_body"]["prompt"]

    async def scenario() -> None:
        async with ComfyUIClient(comfyui_idle.url) as client:
            await client.run_prompt(prompt)

    with pytest.raises(JobFailed) as failure:
        asyncio.run(scenario())

    assert failure.value.code == "comfyui_validation_failed", failure.value.message
    assert failure.value.message.startswith("ComfyUI rejected the workflow: ")
    text = json.dumps(failure.value.to_dict())
    assert "Traceback" not in text
    assert not ABSOLUTE_PATH.search(failure.value.message), failure.value.message


def test_corrupt_input_is_an_execution_error_naming_the_node_without_paths_or_traceback(
    comfyui_idle, tmp_path
):
    # s07: LoadImage of a file that is not an image fails at run time inside ComfyUI.
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    name = f"corrupt-{uuid.uuid4().hex[:6]}.png"

    async def scenario() -> None:
        async with ComfyUIClient(comfyui_idle.url) as client:
            uploaded = await client.upload_image(corrupt, name=name, subfolder="comfyswap-test")
            graph = fresh(load_workflow("exec_error_corrupt_image"))
            for node in graph.values():
                if node["class_type"] == "LoadImage":
                    node["inputs"]["image"] = uploaded.load_image_value
            await client.run_prompt(graph)

    with pytest.raises(JobFailed) as failure:
        asyncio.run(scenario())

    error = failure.value
    assert error.code == "comfyui_execution_error"
    assert "LoadImage" in error.message
    assert "traceback" not in error.details
    assert "Traceback" not in json.dumps(error.to_dict())
    assert not ABSOLUTE_PATH.search(json.dumps(error.to_dict())), error.to_dict()
    assert str(comfyui_idle.base_dir) not in json.dumps(error.to_dict())


def test_partially_valid_prompt_is_an_error_and_its_valid_part_is_stopped(comfyui_idle, tmp_path):
    # A 200 with node_errors: the valid output is queued anyway; it must not run to its end.
    graph = blur_chain(100)
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["404", 0], "filename_prefix": "broken"}}

    with pytest.raises(JobFailed) as failure:
        run_job(engine_for(comfyui_idle), make_task({"wf_json": graph}), tmp_path)

    assert failure.value.code == "comfyui_validation_failed"
    assert "node 9" in failure.value.message
    wait_until(
        lambda: queue(comfyui_idle) == {"queue_running": [], "queue_pending": []},
        timeout_s=10,
        what="the valid part to be stopped",
    )
    assert list((comfyui_idle.base_dir / "output").glob("chain_*")) == []


def test_cancel_interrupts_the_running_prompt_and_the_next_one_runs(comfyui_idle, tmp_path):
    cancel = asyncio.Event()
    seen: list[Progress] = []

    async def scenario() -> None:
        engine = engine_for(comfyui_idle)

        async def cancel_once_running() -> None:
            while not any("ImageBlur" in p.stage for p in seen):
                await asyncio.sleep(0.05)
            cancel.set()

        canceller = asyncio.create_task(cancel_once_running())
        try:
            await _run(engine, make_task({"wf_json": blur_chain(100)}), tmp_path / "a", cancel, seen)
        finally:
            canceller.cancel()

    with pytest.raises(JobCancelled):
        asyncio.run(scenario())

    assert queue(comfyui_idle) == {"queue_running": [], "queue_pending": []}
    result = run_job(
        engine_for(comfyui_idle), make_task({"wf_json": fresh(load_workflow("empty_save"))}), tmp_path / "b"
    )
    assert len(result.outputs) == 1


def test_progress_reaches_the_task_node_by_node_during_a_real_graph(comfyui_idle, tmp_path):
    seen: list[Progress] = []

    result = run_job(engine_for(comfyui_idle), make_task({"wf_json": blur_chain(6)}), tmp_path, seen=seen)

    assert len(result.outputs) == 1
    stages = [p.stage for p in seen]
    assert any(stage.startswith("node ") and stage.endswith("ImageBlur") for stage in stages), stages
    values = [p.value for p in seen]
    assert values == sorted(values) and values[-1] == seen[-1].max == 8
    assert len(set(values)) >= 4  # intermediate values, not just start and end


@pytest.mark.parametrize("template", ["basic_generation", "image_to_image"])
def test_checkpoint_templates_pass_real_validation_and_fail_only_at_loading_the_empty_checkpoint(
    comfyui_idle, media, tmp_path, template
):
    task_data: dict[str, Any] = {"prompt": "a lighthouse", "steps": 1, "width": 64, "height": 64}
    if template == "image_to_image":
        task_data["image_url"] = media.add(
            f"/{uuid.uuid4().hex}.png", "image/png", png_bytes(64, 64, (9, 9, 9))
        )
    input_data = build_input_data(template, task_data, allow_raw=False)

    with pytest.raises(JobFailed) as failure:
        run_job(engine_for(comfyui_idle), make_task(input_data, template), tmp_path)

    # Past /prompt validation (every node, input and link accepted by the real server),
    # stopped where the weights are read: the empty checkpoint file.
    assert failure.value.code == "comfyui_execution_error", failure.value.message
    assert "CheckpointLoaderSimple" in failure.value.message
    assert not ABSOLUTE_PATH.search(failure.value.message), failure.value.message


def test_invert_image_template_fetches_uploads_and_wires_the_input(comfyui_idle, media, tmp_path):
    url = media.add(f"/{uuid.uuid4().hex}.png", "image/png", png_bytes(20, 10, (10, 200, 30)))
    input_data = build_input_data(
        "invert_image", {"image_url": url, "width": 40, "height": 20}, allow_raw=False
    )

    result = run_job(engine_for(comfyui_idle), make_task(input_data, "invert_image"), tmp_path)

    with Image.open(result.outputs[0].path) as picture:
        assert picture.size == (40, 20)
        assert near(picture.convert("RGB").getpixel((5, 5)), (245, 55, 225))


def test_custom_graph_brings_its_own_input_image(comfyui_idle, media, tmp_path):
    url = media.add(f"/{uuid.uuid4().hex}.png", "image/png", png_bytes(30, 20, (200, 100, 0)))
    input_data = build_input_data("custom", invert_own_image(url), allow_raw=True)

    result = run_job(engine_for(comfyui_idle), make_task(input_data), tmp_path)

    with Image.open(result.outputs[0].path) as picture:
        assert picture.size == (30, 20)
        assert near(picture.convert("RGB").getpixel((3, 3)), (55, 155, 255))
    assert list((comfyui_idle.input_dir / "comfyswap").iterdir()) == []


def test_engine_deadline_interrupts_comfyui(comfyui_idle, tmp_path):
    # 100 blurs at 1024 px radius 16: over a minute even on a quiet machine (at 512 px
    # radius 8 it ran 100 blurs inside the 4 s), so the deadline always lands mid-graph;
    # one node is under a second quiet, a few seconds busy, hence the queue's 30 s.
    graph = blur_chain(100, size=1024, radius=16)
    with pytest.raises(JobFailed) as failure:
        run_job(engine_for(comfyui_idle, task_timeout_s=4.0), make_task({"wf_json": graph}), tmp_path)

    assert failure.value.code == "comfyui_timeout"
    wait_until(
        lambda: queue(comfyui_idle) == {"queue_running": [], "queue_pending": []},
        timeout_s=30,
        what="ComfyUI's queue to be empty after the timeout",
    )


def test_runner_route_helpers_answer_from_the_real_server(comfyui_idle):
    engine = engine_for(comfyui_idle)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        try:
            interrupted = await engine.interrupt(None)
            return (
                interrupted,
                await engine.health(),
                await engine.queue_status(),
                await engine.system_stats(),
            )
        finally:
            await engine.close()

    interrupted, health, status, stats = asyncio.run(scenario())

    assert interrupted == {"interrupted": True, "prompt_id": None}
    assert health["status"] == "available" and health["comfyui_version"] == "0.3.64"
    assert status == {"running": [], "pending": [], "queue_remaining": 0}
    assert stats["devices"][0]["name"] == "cpu"
