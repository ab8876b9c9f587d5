"""Issue 13, findings 7 and 10: a video input obeys MAX_IMAGE_PIXELS per frame and the
frame and duration caps, judged from the container's metadata before any frame is decoded
(a one-frame 16000x16000 MJPEG, a 100k-frame clip holding the only face-swap slot)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import UnsafeInput
from shared.safe_fetch import SafeFetcher
from shared.video import check_video
from tests.security.support import LocalHttpServer, encode_video, run

FIELD = "task_data.target_url"


@pytest.fixture(scope="module")
def clip_64px_8_frames() -> bytes:
    return encode_video("mp4", "mpeg4", size=64, frames=8)  # 1 s at 8 fps


def fetch(
    make_fetcher: Callable[..., SafeFetcher], server: LocalHttpServer, body: bytes, dest: Path, **caps: int
):
    fetcher = make_fetcher(allow_loopback=True, check_video=check_video, **caps)
    return run(fetcher.fetch_to_file(server.serve("/clip.mp4", body), dest, field=FIELD))


def test_a_video_within_every_cap_is_fetched_with_its_frame_size(
    make_fetcher, http_server, dest_dir, clip_64px_8_frames
) -> None:
    fetched = fetch(make_fetcher, http_server, clip_64px_8_frames, dest_dir)

    assert (fetched.kind, fetched.width, fetched.height) == ("video", 64, 64)


def test_video_frames_over_max_image_pixels_are_refused_before_decoding(
    make_fetcher, http_server, dest_dir, clip_64px_8_frames
) -> None:
    with pytest.raises(UnsafeInput) as caught:
        fetch(make_fetcher, http_server, clip_64px_8_frames, dest_dir, max_image_pixels=64 * 64 - 1)

    assert caught.value.code == "image_too_large"
    assert caught.value.details["field"] == FIELD
    assert (caught.value.details["width"], caught.value.details["height"]) == (64, 64)


def test_a_video_with_more_frames_than_the_cap_is_refused(
    make_fetcher, http_server, dest_dir, clip_64px_8_frames
) -> None:
    with pytest.raises(UnsafeInput) as caught:
        fetch(make_fetcher, http_server, clip_64px_8_frames, dest_dir, max_video_frames=5)

    assert caught.value.code == "video_too_long"
    assert caught.value.details["frames"] == 8


def test_a_video_longer_than_the_duration_cap_is_refused(tmp_path: Path, clip_64px_8_frames: bytes) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip_64px_8_frames)

    with pytest.raises(UnsafeInput) as caught:
        check_video(path, max_pixels=40_000_000, max_frames=1000, max_duration_s=0.5)

    assert caught.value.code == "video_too_long"
    assert caught.value.details["duration_s"] == pytest.approx(1.0, abs=0.2)
