"""Face swap through the public host: the direct route, a video task, the runner's
face-swap routes (the dev server forwards them to the runner)."""

from __future__ import annotations

import io

import av
import pytest
from PIL import Image

from tests.e2e.conftest import data_url
from tests.faceswap.media import write_clip

pytestmark = pytest.mark.e2e


def test_direct_process_route_answers_with_the_result(stack, grace_hopper_path, astronaut_png):
    body = {
        "source_url": data_url(grace_hopper_path, "image/jpeg"),
        "target_url": data_url(astronaut_png, "image/png"),
    }

    response = stack.client.post("/api/face-swap/process", json=body, timeout=120)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == "success"
    assert answer["processing_time"] > 0
    image = Image.open(io.BytesIO(stack.client.get(answer["result"]["output_url"]).content))
    assert image.size == (512, 512)


def test_direct_process_route_validates_like_create(stack):
    response = stack.client.post("/api/face-swap/process", json={"source_url": "https://e.example/a.jpg"})

    assert response.status_code == 400
    assert response.json()["error"]["details"]["field"] == "task_data.target_url"


def test_video_task_keeps_frames_fps_and_audio(stack, media_server, grace_hopper_path, tmp_path):
    base_url, files = media_server
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frame_count=20, size=256, fps=25)
    files["/clip.mp4"] = ("video/mp4", clip.read_bytes())

    created = stack.create_face_swap(data_url(grace_hopper_path, "image/jpeg"), f"{base_url}/clip.mp4")
    view = stack.wait(created.json()["taskId"], timeout_s=120)

    assert view["status"] == "COMPLETED", view["task"].get("error")
    output = view["task"]["output_data"]["outputs"][0]
    assert output["content_type"] == "video/mp4" and output["kind"] == "video"
    result = tmp_path / "out.mp4"
    result.write_bytes(stack.client.get(output["url"]).content)
    with av.open(str(result)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        assert float(video.average_rate) == pytest.approx(25, abs=0.01)
        assert sum(1 for _ in container.decode(video=0)) == 20
        assert len(container.streams.audio) == 1
    assert view["task"]["progress"]["stage"] == "done"


def test_face_swap_health_and_workflows_through_the_public_host(stack):
    health = stack.client.get("/api/face-swap/health")
    workflows = stack.client.get("/api/face-swap/workflows")
    queue = stack.client.get("/api/face-swap/queue-status")

    assert health.status_code == 200 and health.json()["status"] == "available"
    assert "basic_generation" in workflows.json()["workflows"]
    assert "queue_length" in queue.json()
