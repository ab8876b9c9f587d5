"""Fixtures for the ComfyUI engine tests: the double as a real server, inputs on loopback.

The double runs as a subprocess on 127.0.0.1 for the whole session (as ComfyUI would run
next to the runner); each test resets its queue, history, cache and hooks. Input images
are served by a small HTTP server on loopback and fetched by ``LoopbackFetcher``, a
stand-in for shared.safe_fetch.SafeFetcher that refuses anything but 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from gpu_runner.engines.comfyui import ComfyUIClient, ComfyUIEngine
from shared.settings import Settings
from shared.tasks import Task, TaskParams
from tests.fakes import comfyui_double as comfyui_double_server
from tests.servers import ServerProcess

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "tests" / "fakes" / "comfyui_data" / "workflows"


def load_workflow(name: str) -> dict[str, Any]:
    return dict(json.loads((WORKFLOWS / f"{name}.json").read_text()))


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[...] = rgb
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def start_double(tmp_dir: Path, name: str = "comfyui-double", port: int = 0) -> ServerProcess:
    return comfyui_double_server.start(tmp_dir / f"{name}-root", port=port, name=name, log_dir=tmp_dir)


@pytest.fixture(scope="session")
def comfyui_double(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_double(tmp_path_factory.mktemp("comfyui"))
    # probe_in.png is what the recorded workflows load: 96x64, colour (0, 0, 40) as in s02.
    httpx.post(
        server.url + "/upload/image",
        files={"image": ("probe_in.png", png_bytes(96, 64, (0, 0, 40)), "image/png")},
        timeout=10,
    ).raise_for_status()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _reset_double(request: pytest.FixtureRequest) -> None:
    if "comfyui_double" in request.fixturenames:
        url = request.getfixturevalue("comfyui_double").url
        httpx.post(url + "/__double__/reset", timeout=10).raise_for_status()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def input_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(base URL, folder): files put in the folder are served on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("inputs")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()


def serve_image(input_server: tuple[str, Path], data: bytes, suffix: str = ".png") -> str:
    base_url, folder = input_server
    name = f"{uuid.uuid4().hex}{suffix}"
    (folder / name).write_bytes(data)
    return f"{base_url}/{name}"


@dataclasses.dataclass(frozen=True)
class LoopbackFetched:
    path: Path
    content_type: str


class LoopbackFetcher:
    """Test stand-in for SafeFetcher: loopback http only, so no test can reach the network."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    async def fetch_to_file(
        self, url: str, dest_dir: Path, *, field: str, allowed_kinds: frozenset[str] = frozenset({"image"})
    ) -> LoopbackFetched:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname != "127.0.0.1":
            raise AssertionError(f"{field}: the test fetcher only reaches loopback, not {url}")
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url)
            response.raise_for_status()
        dest_dir.mkdir(parents=True, exist_ok=True)
        path = dest_dir / f"input-{uuid.uuid4().hex}{Path(parts.path).suffix}"
        path.write_bytes(response.content)
        self.fetched.append(url)
        return LoopbackFetched(path, response.headers.get("content-type", "application/octet-stream"))


def make_client(url: str, **overrides: Any) -> ComfyUIClient:
    options: dict[str, Any] = {
        "history_poll_interval_s": 0.3,
        "unreachable_after_s": 1.5,
        "connect_timeout_s": 3.0,
        "cancel_grace_s": 5.0,
        **overrides,
    }
    return ComfyUIClient(url, client_id=f"test-{uuid.uuid4().hex[:8]}", **options)


def make_engine(
    url: str, *, task_timeout_s: float = 30.0, restart_wait_s: float = 0.0, **client_overrides: Any
) -> ComfyUIEngine:
    settings = Settings(comfyui_url=url, task_timeout_s=task_timeout_s, comfyui_restart_wait_s=restart_wait_s)
    return ComfyUIEngine(settings, LoopbackFetcher(), client=make_client(url, **client_overrides))


def make_task(input_data: dict[str, Any], workflow: str = "custom") -> Task:
    return Task(workflow=workflow, environment="comm", params=TaskParams(input_data=input_data))
