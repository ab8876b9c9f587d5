"""Swapping a face through a real H.264 clip with an AAC track: timing, audio, identity, cancel."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt
import pytest

from gpu_runner.engines.cpu_swap import (
    FaceSwapper,
    NoFaceInTarget,
    OutputSize,
    SourceFace,
    SwapCancelled,
    VideoInfo,
)
from gpu_runner.engines.cpu_swap.video import _write_back
from gpu_runner.engines.cpu_swap.warp import FaceBox

from .conftest import IdentityOracle
from .media import write_clip

ByteImage = npt.NDArray[np.uint8]
CLIP_FRAMES = 40
CLIP_FPS = 25
BLANK_FRAMES = frozenset({20, 21, 22})


@dataclasses.dataclass(frozen=True)
class StreamFacts:
    video_codec: str
    pixel_format: str
    width: int
    height: int
    frame_rate: Fraction
    frames: list[ByteImage]
    video_seconds: float
    audio_codec: str | None
    audio_seconds: float
    faststart: bool


def read_stream_facts(path: Path) -> StreamFacts:
    """Everything the tests check, read back by decoding the file."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = [
            np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8) for frame in container.decode(video)
        ]
        audio = container.streams.audio[0] if container.streams.audio else None
        audio_seconds = 0.0
        if audio is not None and audio.duration is not None and audio.time_base is not None:
            audio_seconds = float(audio.duration * audio.time_base)
        assert video.duration is not None
        assert video.time_base is not None
        facts = StreamFacts(
            video_codec=video.codec_context.name,
            pixel_format=str(video.codec_context.pix_fmt),
            width=video.width,
            height=video.height,
            frame_rate=Fraction(video.average_rate or 0),
            frames=frames,
            video_seconds=float(video.duration * video.time_base),
            audio_codec=audio.codec_context.name if audio is not None else None,
            audio_seconds=audio_seconds,
            faststart=False,
        )
    head = path.read_bytes()
    return dataclasses.replace(facts, faststart=0 <= head.find(b"moov") < head.find(b"mdat"))


@dataclasses.dataclass(frozen=True)
class SwappedClip:
    target_path: Path
    output_path: Path
    info: VideoInfo
    progress_calls: list[tuple[int, int]]


@pytest.fixture(scope="module")
def swapped_clip(
    tmp_path_factory: pytest.TempPathFactory, swapper: FaceSwapper, source_face: SourceFace
) -> SwappedClip:
    """One 40-frame clip (frames 20-22 blank), swapped once and shared by the read-only checks."""
    folder = tmp_path_factory.mktemp("video")
    target_path, output_path = folder / "target.mp4", folder / "swapped.mp4"
    write_clip(target_path, frame_count=CLIP_FRAMES, fps=CLIP_FPS, blank_frames=BLANK_FRAMES)
    progress_calls: list[tuple[int, int]] = []

    info = swapper.swap_video(
        source_face,
        target_path,
        output_path,
        progress=lambda done, total: progress_calls.append((done, total)),
        should_stop=lambda: False,
    )
    return SwappedClip(target_path, output_path, info, progress_calls)


def test_output_is_a_faststart_h264_yuv420p_mp4_with_aac_audio(swapped_clip: SwappedClip) -> None:
    facts = read_stream_facts(swapped_clip.output_path)

    assert facts.video_codec == "h264"
    assert facts.pixel_format == "yuv420p"
    assert facts.audio_codec == "aac"
    assert facts.faststart
    assert swapped_clip.info.audio == "copied"


def test_frame_count_size_fps_and_durations_match_the_target(swapped_clip: SwappedClip) -> None:
    target = read_stream_facts(swapped_clip.target_path)
    output = read_stream_facts(swapped_clip.output_path)

    assert len(output.frames) == len(target.frames) == CLIP_FRAMES
    assert (output.width, output.height) == (target.width, target.height)
    assert output.frame_rate == target.frame_rate == CLIP_FPS
    one_frame = 1 / CLIP_FPS
    assert abs(output.video_seconds - target.video_seconds) < one_frame
    assert abs(output.audio_seconds - target.audio_seconds) < one_frame
    assert abs(output.audio_seconds - output.video_seconds) < one_frame
    info = swapped_clip.info
    assert (info.frames, info.fps, info.width, info.height) == (
        CLIP_FRAMES,
        CLIP_FPS,
        target.width,
        target.height,
    )
    assert abs(info.duration - CLIP_FRAMES / CLIP_FPS) < one_frame


def test_frames_without_a_face_pass_through_and_the_others_are_swapped(swapped_clip: SwappedClip) -> None:
    target = read_stream_facts(swapped_clip.target_path)
    output = read_stream_facts(swapped_clip.output_path)

    def mean_difference(index: int) -> float:
        return float(np.abs(output.frames[index].astype(np.int16) - target.frames[index]).mean())

    # Faceless frames keep their decoded YUV values: only x264's own loss can move them.
    assert all(mean_difference(index) < 0.5 for index in BLANK_FRAMES)
    assert all(mean_difference(index) > 2.0 for index in (0, 10, 30, 39))
    assert swapped_clip.info.frames_swapped == CLIP_FRAMES - len(BLANK_FRAMES)


def test_only_the_face_box_is_converted_back_to_yuv(target_image: ByteImage) -> None:
    planes = np.ascontiguousarray(cv2.cvtColor(target_image, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8)
    original = planes.copy()
    image = np.asarray(cv2.cvtColor(planes, cv2.COLOR_YUV2BGR_I420), dtype=np.uint8)
    box = FaceBox(181, 77, 270, 175)  # odd edges: the write-back widens them to even
    image[box.y0 : box.y1, box.x0 : box.x1] = (30, 60, 90)

    _write_back(image, box, planes)

    height = target_image.shape[0]
    luma_changed = planes[:height] != original[:height]
    rows, columns = np.nonzero(luma_changed)
    # Nothing outside the box widened to even edges (rows 76..175, columns 180..269) moved.
    assert rows.min() >= 76
    assert rows.max() <= 175
    assert columns.min() >= 180
    assert columns.max() <= 269
    flat_colour = cv2.cvtColor(np.full((2, 2, 3), (30, 60, 90), np.uint8), cv2.COLOR_BGR2YUV_I420)
    assert np.all(planes[100, 200] == flat_colour[0, 0])
    chroma_changed = (planes[height:] != original[height:]).sum()
    assert 0 < chroma_changed <= 2 * (100 // 2) * (90 // 2)


def test_sampled_frames_read_as_the_source_person(
    swapped_clip: SwappedClip, source_image: ByteImage, identity: IdentityOracle
) -> None:
    target = read_stream_facts(swapped_clip.target_path)
    output = read_stream_facts(swapped_clip.output_path)
    source_embedding = identity.embedding(source_image)

    for index in (3, 17, 33):
        swapped = identity.embedding(output.frames[index])
        to_source = float(np.linalg.norm(swapped - source_embedding))
        to_target = float(np.linalg.norm(swapped - identity.embedding(target.frames[index])))
        assert to_source < to_target, f"frame {index}: {to_source:.3f} to source, {to_target:.3f} to target"


def test_progress_rises_to_the_frame_count(swapped_clip: SwappedClip) -> None:
    done = [call[0] for call in swapped_clip.progress_calls]

    assert done == sorted(done)
    assert swapped_clip.progress_calls[-1] == (CLIP_FRAMES, CLIP_FRAMES)
    assert len(done) >= CLIP_FRAMES // 2


def test_should_stop_cancels_between_frames_and_leaves_no_file(
    tmp_path: Path, swapper: FaceSwapper, source_face: SourceFace
) -> None:
    target_path, output_path = tmp_path / "target.mp4", tmp_path / "swapped.mp4"
    write_clip(target_path, frame_count=20)
    checks = 0

    def stop_after_five_frames() -> bool:
        nonlocal checks
        checks += 1
        return checks > 5

    with pytest.raises(SwapCancelled) as raised:
        swapper.swap_video(source_face, target_path, output_path, should_stop=stop_after_five_frames)

    assert raised.value.details == {"frames_done": 5}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["target.mp4"]


def test_other_audio_is_reencoded_to_aac_and_resolution_gives_even_sides(
    tmp_path: Path, swapper: FaceSwapper, source_face: SourceFace
) -> None:
    target_path, output_path = tmp_path / "target.mkv", tmp_path / "swapped.mp4"
    write_clip(target_path, frame_count=15, size=320, audio_codec="pcm_s16le", audio_rate=48_000)

    info = swapper.swap_video(source_face, target_path, output_path, output_size=OutputSize(251, 251))

    facts = read_stream_facts(output_path)
    assert info.audio == "reencoded"
    assert facts.audio_codec == "aac"
    assert abs(facts.audio_seconds - 15 / CLIP_FPS) < 1 / CLIP_FPS
    assert (facts.width, facts.height) == (250, 250)
    assert len(facts.frames) == 15


def test_a_video_with_no_face_at_all_raises_no_face_in_target(
    tmp_path: Path, swapper: FaceSwapper, source_face: SourceFace
) -> None:
    target_path, output_path = tmp_path / "target.mp4", tmp_path / "swapped.mp4"
    write_clip(target_path, frame_count=5, blank_frames=frozenset(range(5)))

    with pytest.raises(NoFaceInTarget):
        swapper.swap_video(source_face, target_path, output_path)

    assert not output_path.exists()


def test_faces_are_tracked_between_detections_and_swapped_on_pool_threads(
    tmp_path: Path, swapper: FaceSwapper, source_face: SourceFace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15: detection every frame and a swap on the decoding thread left the cores the
    codecs do not use idle. Now detection runs every _DETECT_EVERY frames while the face is
    tracked, and frames are swapped on a pool while the caller decodes and encodes."""
    import threading

    from gpu_runner.engines.cpu_swap.video import _DETECT_EVERY

    target_path, output_path = tmp_path / "target.mp4", tmp_path / "swapped.mp4"
    write_clip(target_path, frame_count=CLIP_FRAMES, fps=CLIP_FPS)
    detections = 0
    swap_threads: set[str] = set()
    detect_boxes, swap_onto = swapper.detect_boxes, swapper.swap_onto

    def counting_detect(*args: object, **kwargs: object) -> object:
        nonlocal detections
        detections += 1
        return detect_boxes(*args, **kwargs)  # type: ignore[arg-type]

    def recording_swap(*args: object, **kwargs: object) -> object:
        swap_threads.add(threading.current_thread().name)
        return swap_onto(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(swapper, "detect_boxes", counting_detect)
    monkeypatch.setattr(swapper, "swap_onto", recording_swap)
    info = swapper.swap_video(source_face, target_path, output_path)

    assert info.frames == info.frames_swapped == CLIP_FRAMES
    assert detections <= CLIP_FRAMES // _DETECT_EVERY + 1, detections
    assert swap_threads and all(name.startswith("cpu-swap-frame") for name in swap_threads), swap_threads
