"""Fixtures for the FaceFusion engines: real photos and a real clip as data: URLs, fetched
by the real SafeFetcher, and the two stand-ins (the CLI script and the HTTP service)."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_runner.engines.base import EngineResult, PreparedJob
from gpu_runner.engines.facefusion_models import COMMON_MODEL_FILES, SWAPPER_MODEL_FILES, crc32_hex
from gpu_runner.engines.faceswap import FaceSwapEngineBase
from shared.safe_fetch import SafeFetcher
from shared.tasks import Progress, Task, TaskParams
from tests.faceswap.media import GRACE_HOPPER_PATH, write_clip
from tests.servers import ServerProcess, free_port, start_server

FAKES = Path(__file__).resolve().parents[1] / "fakes"
FAKE_CLI = FAKES / "facefusion_cli.py"
FAKE_API = FAKES / "facefusion_api_fake.py"
CLIP_FRAMES = 12
CLIP_FPS = 25


def data_url(path: Path, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def face_swap_task(**input_data: Any) -> Task:
    return Task(workflow="face_swap", environment="face_swap", params=TaskParams(input_data=input_data))


@pytest.fixture
def fetcher() -> SafeFetcher:
    return SafeFetcher(
        max_bytes=50 * 1024 * 1024, timeout_s=10.0, max_image_pixels=40_000_000, allow_loopback=True
    )


@pytest.fixture(scope="session")
def source_url() -> str:
    """Grace Hopper (matplotlib sample data): the face to use."""
    return data_url(GRACE_HOPPER_PATH, "image/jpeg")


@pytest.fixture(scope="session")
def target_image_url(astronaut_png: Path) -> str:
    """The astronaut (scikit-image data), as PNG: the image to put the face in."""
    return data_url(astronaut_png, "image/png")


@pytest.fixture(scope="session")
def target_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-frame, 25 fps clip of the astronaut with an AAC tone."""
    path = tmp_path_factory.mktemp("clip") / "astronaut.mp4"
    write_clip(path, frame_count=CLIP_FRAMES, size=160, fps=CLIP_FPS)
    return path


@pytest.fixture(scope="session")
def target_video_url(target_clip: Path) -> str:
    return data_url(target_clip, "video/mp4")


def write_model_files(models_dir: Path, names: Iterable[str] | None = None) -> Path:
    """Model files as FaceFusion checks them: ``NAME.onnx`` and ``NAME.hash`` holding its
    CRC32 (the engine checks only that; the real-peer tier writes real stand-in ONNX)."""
    if names is None:
        names = {*COMMON_MODEL_FILES, *(name for files in SWAPPER_MODEL_FILES.values() for name in files)}
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        model_path = models_dir / f"{name}.onnx"
        model_path.write_bytes(f"stand-in weights of {name}".encode())
        (models_dir / f"{name}.hash").write_text(crc32_hex(model_path))
    return models_dir


class Run:
    """One engine job, prepared through the real fetcher, with its progress recorded."""

    def __init__(self, engine: FaceSwapEngineBase, task: Task, workdir: Path) -> None:
        self.engine = engine
        self.task = task
        self.workdir = workdir
        self.cancel = asyncio.Event()
        self.progress: list[Progress] = []
        self.job: PreparedJob | None = None

    async def prepare_and_run(self) -> EngineResult:
        self.job = await self.engine.prepare(self.task, self.workdir)
        return await self.engine.run(self.job, self.progress.append, self.cancel)

    def __call__(self) -> EngineResult:
        return asyncio.run(self.prepare_and_run())


@pytest.fixture
def image_run(tmp_path: Path, source_url: str, target_image_url: str) -> Callable[..., Run]:
    """``image_run(engine, **inputs)``: a Run of ``engine`` putting the source face into the
    astronaut photo, in ``tmp_path/work``."""

    def make(engine: FaceSwapEngineBase, **inputs: Any) -> Run:
        task = face_swap_task(source_url=source_url, target_url=target_image_url, **inputs)
        return Run(engine, task, tmp_path / "work")

    return make


@pytest.fixture
def video_run(tmp_path: Path, source_url: str, target_video_url: str) -> Callable[..., Run]:
    """``video_run(engine, **inputs)``: the same into the astronaut clip."""

    def make(engine: FaceSwapEngineBase, **inputs: Any) -> Run:
        task = face_swap_task(source_url=source_url, target_url=target_video_url, **inputs)
        return Run(engine, task, tmp_path / "work")

    return make


@pytest.fixture
def fake_cli_command() -> str:
    return f"{sys.executable} {FAKE_CLI}"


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("facefusion-shared")


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Iterator[ServerProcess]:
    port = free_port()
    server = start_server(
        "facefusion_api_fake",
        [sys.executable, str(FAKE_API), "--port", str(port), "--shared-dir", str(shared_dir)],
        url=f"http://127.0.0.1:{port}",
        log_dir=tmp_path_factory.mktemp("logs"),
        health_path="/",
        timeout_s=30.0,
    )
    try:
        yield server
    finally:
        server.stop()


def set_knobs(server: ServerProcess, **knobs: Any) -> None:
    httpx.post(f"{server.url}/_control", json=knobs, timeout=5.0).raise_for_status()


def received(server: ServerProcess) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/_requests", timeout=5.0)
    response.raise_for_status()
    calls: list[dict[str, Any]] = response.json()
    return calls
