"""End to end through real HTTP: create, claim, fetch, swap, upload, report, download."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e


def _data_url(path, content_type):
    return f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_face_swap_completes_and_changes_only_the_face(stack, media_server, grace_hopper_path, astronaut_png):
    base_url, files = media_server
    files["/target.png"] = ("image/png", astronaut_png.read_bytes())
    body = {
        "workflow": "face_swap",
        "environment": "face_swap",
        "task_data": {
            "source_url": _data_url(grace_hopper_path, "image/jpeg"),
            "target_url": f"{base_url}/target.png",
        },
    }

    created = stack.create(body)
    assert created.status_code == 200, created.text
    view = stack.wait(created.json()["taskId"])

    assert view["status"] == "COMPLETED", view
    task = view["task"]
    assert set(task["timings"]) >= {"queue_wait_s", "download_s", "engine_s", "upload_s"}
    result = stack.client.get(view["result"]["url"])
    assert result.status_code == 200
    output = np.asarray(Image.open(io.BytesIO(result.content)).convert("RGB")).astype(int)
    target = np.asarray(Image.open(astronaut_png).convert("RGB")).astype(int)
    assert output.shape == target.shape
    changed = np.abs(output - target).sum(axis=2) > 30
    ys, xs = np.nonzero(changed)
    # The astronaut's face is around (x 170-290, y 60-200) in the 512x512 photo.
    assert changed[60:200, 170:290].mean() > 0.2
    assert xs.min() > 100 and xs.max() < 360 and ys.min() > 20 and ys.max() < 260
    assert not changed[300:, :].any() and not changed[:, :100].any()


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("unreachable", "input_unreachable"),
        ("not_an_image", "unsupported_media"),
        ("no_face_in_source", "no_face_in_source"),
    ],
)
def test_inputs_that_fail_at_fetch_or_swap_end_failed_with_a_code(
    stack, media_server, astronaut_png, case, code
):
    base_url, files = media_server
    files["/astronaut.png"] = ("image/png", astronaut_png.read_bytes())
    files["/fake.jpg"] = ("image/jpeg", b"<html>this is not an image</html>" * 20)
    flat = io.BytesIO()
    Image.new("RGB", (256, 256), (120, 160, 200)).save(flat, format="PNG")
    files["/flat.png"] = ("image/png", flat.getvalue())
    from tests.servers import free_port

    source = {
        "unreachable": f"http://127.0.0.1:{free_port()}/gone.jpg",
        "not_an_image": f"{base_url}/fake.jpg",
        "no_face_in_source": f"{base_url}/flat.png",
    }[case]
    before = stack.client.get("/api/tasks/").json()["stats"]

    created = stack.create(
        {
            "workflow": "face_swap",
            "task_data": {"source_url": source, "target_url": f"{base_url}/astronaut.png"},
        }
    )
    view = stack.wait(created.json()["taskId"], timeout_s=60)

    assert view["status"] == "FAILED"
    error = view["task"]["error"]
    assert error["code"] == code, error
    assert error["message"]
    after = stack.client.get("/api/tasks/").json()["stats"]
    assert after["completed"] == before["completed"]


def test_comfyui_task_without_comfyui_fails_fast_naming_the_setting(stack):
    created = stack.create({"workflow": "basic_generation", "task_data": {"prompt": "a lighthouse"}})
    assert created.status_code == 200
    wf_json = created.json()["task"]["params"]["input_data"]["wf_json"]
    assert isinstance(wf_json["3"]["inputs"]["seed"], int)

    view = stack.wait(created.json()["taskId"], timeout_s=30)

    assert view["status"] == "FAILED"
    assert view["task"]["error"]["code"] == "comfyui_not_configured"
    assert "COMFYUI_URL" in view["task"]["error"]["message"]
