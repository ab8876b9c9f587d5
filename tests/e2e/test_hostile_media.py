"""Hostile media through the whole stack: each ends as a clear FAILED (or a 4xx at
create), never a crash, a retry loop, or a file outside the task's folders."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.e2e.conftest import data_url
from tests.faceswap.media import write_clip

pytestmark = pytest.mark.e2e


def _bomb_png() -> bytes:
    """A 1x1 PNG whose header claims 30000x30000 pixels (decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("case", ["truncated_video", "corrupt_video", "bomb_png", "truncated_jpeg"])
def test_hostile_target_ends_failed_with_a_code(stack, media_server, grace_hopper_path, tmp_path, case):
    base_url, files = media_server
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frame_count=12, size=192)
    payloads = {
        "truncated_video": ("video/mp4", clip.read_bytes()[: len(clip.read_bytes()) // 3]),
        "corrupt_video": ("video/mp4", clip.read_bytes()[:64] + bytes(range(256)) * 40),
        "bomb_png": ("image/png", _bomb_png()),
        "truncated_jpeg": ("image/jpeg", grace_hopper_path.read_bytes()[:5000]),
    }
    files[f"/{case}"] = payloads[case]
    before = {path for path in stack.data_dir.rglob("*") if path.is_file()}

    created = stack.create_face_swap(data_url(grace_hopper_path, "image/jpeg"), f"{base_url}/{case}")
    view = stack.wait(created.json()["taskId"], timeout_s=90)

    assert view["status"] == "FAILED", view["task"]
    error = view["task"]["error"]
    assert error["retryable"] is False
    assert error["code"] in {
        "corrupt_media",
        "image_too_large",
        "unsupported_media",
        "unreadable_media",
        "no_face_in_target",
    }
    assert view["task"]["attempts"] == 1, "a permanent media error must not be retried"
    written = {path for path in stack.data_dir.rglob("*") if path.is_file()} - before
    assert all(path.is_relative_to(stack.data_dir) for path in written)
    assert not any("results" in path.parts for path in written)
