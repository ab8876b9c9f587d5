"""Fixtures of the fault, auth and load tests: real media, a media server, stacks that close."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.faceswap.media import astronaut_bgr, grace_hopper_bgr, write_clip
from tests.faults.stack import FaultStack, MediaServer

# Long enough that a kill or a cancel lands mid-swap (~80 ms a frame on 2 busy cores).
SLOW_CLIP_FRAMES = 120
# A SIGTERM test needs the swap still running when the grace ends: progress is written
# every 2 s and a quiet machine swaps a 256 px frame in ~15 ms, so 120 frames can finish
# inside the grace. 600 frames keep a quiet machine busy ~9 s, a busy one ~50 s.
LONG_CLIP_FRAMES = 600
CLIP_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Media:
    source_jpeg: bytes  # Grace Hopper, 256 px wide
    target_png: bytes  # the astronaut's head, 192 px
    slow_clip_mp4: bytes  # the astronaut clip, SLOW_CLIP_FRAMES frames
    long_clip_mp4: bytes  # the same clip, LONG_CLIP_FRAMES frames
    short_clip_mp4: bytes  # the same clip, 25 frames


def _encode(image: np.ndarray, extension: str) -> bytes:
    ok, buffer = cv2.imencode(extension, image)
    assert ok, f"cannot encode {extension}"
    return bytes(buffer.tobytes())


def astronaut_head(size: int, shift: int = 0) -> np.ndarray:
    """A square crop round the astronaut's face, resized to ``size`` px."""
    photo = astronaut_bgr()
    crop = photo[0 + shift : 300 + shift, 90 + shift : 390 + shift]
    return np.asarray(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA), dtype=np.uint8)


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    folder = tmp_path_factory.mktemp("fault-media")
    photo = grace_hopper_bgr()
    height, width = photo.shape[:2]
    source = cv2.resize(photo, (256, round(height * 256 / width)), interpolation=cv2.INTER_AREA)
    slow, short, long = folder / "slow.mp4", folder / "short.mp4", folder / "long.mp4"
    write_clip(slow, frame_count=SLOW_CLIP_FRAMES, size=CLIP_SIZE, audio_codec=None)
    write_clip(long, frame_count=LONG_CLIP_FRAMES, size=CLIP_SIZE, audio_codec=None)
    write_clip(short, frame_count=25, size=CLIP_SIZE, audio_codec=None)
    return Media(
        source_jpeg=_encode(source, ".jpg"),
        target_png=_encode(astronaut_head(192), ".png"),
        slow_clip_mp4=slow.read_bytes(),
        long_clip_mp4=long.read_bytes(),
        short_clip_mp4=short.read_bytes(),
    )


@pytest.fixture
def media_server(media: Media) -> Iterator[MediaServer]:
    server = MediaServer()
    server.add("/source.jpg", "image/jpeg", media.source_jpeg)
    server.add("/target.png", "image/png", media.target_png)
    server.add("/slow.mp4", "video/mp4", media.slow_clip_mp4)
    server.add("/long.mp4", "video/mp4", media.long_clip_mp4)
    server.add("/short.mp4", "video/mp4", media.short_clip_mp4)
    with server.running():
        yield server


StackFactory = Callable[..., FaultStack]


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[StackFactory]:
    """Start a stack (API, and a runner unless ``runner=False``); every one is stopped after."""
    stacks: list[FaultStack] = []

    def start(
        env: dict[str, str] | None = None,
        *,
        runner_env: dict[str, str] | None = None,
        runner: bool = True,
    ) -> FaultStack:
        stack = FaultStack(tmp_path / f"stack{len(stacks)}", env or {}, runner_env=runner_env)
        stacks.append(stack)
        if runner:
            stack.start_runner()
        return stack

    yield start
    for stack in stacks:
        stack.close()


# --- figures printed at the end of the run ------------------------------------------------
_FIGURES: list[str] = []


@pytest.fixture
def record_figure() -> Callable[[str], None]:
    """Print a measured figure (say, seconds from a runner crash to the task running again)
    in the run's summary, where `make test` output shows it."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("fault recovery figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
