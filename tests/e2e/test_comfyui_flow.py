"""ComfyUI tasks end to end: dev server + runner subprocesses + the ComfyUI double as a
real HTTP/websocket server; outputs are uploaded and listed with their nodes."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import start_stack
from tests.fakes import comfyui_double

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def comfy_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy")
    double = comfyui_double.start(tmp / "comfy", log_dir=tmp / "logs")
    try:
        with start_stack(tmp, {"COMFYUI_URL": double.url}) as stack:
            yield stack, double
    finally:
        double.stop()


def test_text_to_image_template_completes_with_progress_and_outputs(comfy_stack):
    stack, _ = comfy_stack
    created = stack.create(
        {"workflow": "basic_generation", "task_data": {"prompt": "a lighthouse", "steps": 4, "batch_size": 2}}
    )
    assert created.status_code == 200, created.text

    view = stack.wait(created.json()["taskId"])

    assert view["status"] == "COMPLETED", view["task"].get("error")
    outputs = view["task"]["output_data"]["outputs"]
    assert len(outputs) == 2
    assert {output["node_id"] for output in outputs} == {"9"}
    for output in outputs:
        response = stack.client.get(output["url"])
        assert response.status_code == 200
        assert Image.open(io.BytesIO(response.content)).size == (512, 512)
    assert view["task"]["progress"]["stage"] == "done"


def test_image_to_image_with_url_input_inverts_the_input(comfy_stack, media_server, astronaut_png):
    stack, _ = comfy_stack
    base_url, files = media_server
    files["/in.png"] = ("image/png", astronaut_png.read_bytes())

    created = stack.create({"workflow": "invert_image", "task_data": {"image_url": f"{base_url}/in.png"}})
    view = stack.wait(created.json()["taskId"])

    assert view["status"] == "COMPLETED", view["task"].get("error")
    output = view["task"]["output_data"]["outputs"][0]
    assert output["node_id"] == "4" and output["content_type"] == "image/png"
    result = np.asarray(
        Image.open(io.BytesIO(stack.client.get(output["url"]).content)).convert("RGB")
    ).astype(int)
    source = np.asarray(Image.open(astronaut_png).convert("RGB")).astype(int)
    assert np.abs(result - (255 - source)).max() <= 1


def test_validation_error_from_comfyui_fails_with_node_level_message(comfy_stack):
    stack, _ = comfy_stack
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "magic",
                "width": 32,
                "height": 32,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }

    created = stack.create({"workflow": "custom", "task_data": {"wf_json": graph}})
    view = stack.wait(created.json()["taskId"])

    assert view["status"] == "FAILED"
    error = view["task"]["error"]
    assert error["code"] == "comfyui_validation_failed" and error["retryable"] is False
    assert "upscale_method" in error["message"] and "2" in error["message"]


def test_cli_submits_a_template_with_parameters_and_follows_it(comfy_stack, astronaut_png):
    import subprocess

    stack, _ = comfy_stack
    command = [sys.executable, "-m", "comfyswap.cli", "--api-url", stack.api.url]
    command += [
        "submit",
        "invert_image",
        "--param",
        f"image_url={astronaut_png}",
        "--wait",
        "--timeout",
        "60",
    ]

    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert finished.returncode == 0, finished.stderr
    assert "COMPLETED" in finished.stdout
    assert "image/png: http" in finished.stdout


def test_cli_submits_a_workflow_file_and_reports_failure_by_exit_code(comfy_stack, tmp_path):
    import json
    import subprocess

    stack, _ = comfy_stack
    workflow = tmp_path / "broken_api.json"
    workflow.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    command = [sys.executable, "-m", "comfyswap.cli", "--api-url", stack.api.url, "--quiet"]
    command += ["submit", str(workflow), "--wait", "--timeout", "60"]

    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert finished.returncode == 1
    assert "FAILED" in finished.stdout and "comfyui_validation_failed" in finished.stdout


def test_image_to_image_template_with_url_input_completes(comfy_stack, media_server, astronaut_png):
    stack, _ = comfy_stack
    base_url, files = media_server
    files["/photo.png"] = ("image/png", astronaut_png.read_bytes())

    created = stack.create(
        {
            "workflow": "image_to_image",
            "task_data": {"image_url": f"{base_url}/photo.png", "prompt": "oil painting", "steps": 3},
        }
    )
    view = stack.wait(created.json()["taskId"])

    assert view["status"] == "COMPLETED", view["task"].get("error")
    outputs = view["task"]["output_data"]["outputs"]
    assert [output["node_id"] for output in outputs] == ["9"]
    assert stack.client.get(outputs[0]["url"]).status_code == 200
