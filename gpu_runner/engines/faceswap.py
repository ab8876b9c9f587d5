"""Face-swap engines behind the Engine interface, and the choice between them.

``FACE_SWAP_ENGINE`` picks one: ``cpu`` (the embedded classical swap, works on a fresh
machine), ``facefusion`` (FaceFusion's headless-run in the GPU container) or
``facefusion_api`` (the seed's FaceFusion HTTP service). All share ``prepare``: both
inputs are fetched through the SSRF-safe fetcher into the task's work folder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gpu_runner.engines.base import Engine, EngineOutput, EngineResult, PreparedJob, ProgressCallback
from shared.errors import JobCancelled, JobFailed
from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.tasks import Progress, Task
from shared.video import check_video
from shared.workflows import FaceSwapInput

__all__ = ["CpuFaceSwapEngine", "FaceSwapEngineBase", "make_face_swap_engine"]


class FaceSwapEngineBase(Engine):
    """Fetches ``source_url`` (an image) and ``target_url`` (an image or a video)."""

    def __init__(self, settings: Settings, fetcher: SafeFetcher | None = None) -> None:
        self.settings = settings
        self.fetcher = fetcher or SafeFetcher.from_settings(settings, check_video=check_video)

    def parse_input(self, task: Task) -> FaceSwapInput:
        try:
            return FaceSwapInput.model_validate(task.input_data)
        except ValueError as exc:
            raise JobFailed(f"bad face-swap input: {exc}", code="bad_input") from None

    @staticmethod
    def require_model(request: FaceSwapInput, models: frozenset[str], where: str) -> None:
        """Refuse a model the engine cannot run (``model_not_supported``), naming those it can."""
        if request.model not in models:
            raise JobFailed(
                f"model {request.model!r} cannot run on {where}; available: {', '.join(sorted(models))}",
                code="model_not_supported",
            )

    async def prepare(self, task: Task, workdir: Path) -> PreparedJob:
        request = self.parse_input(task)
        source, target = await asyncio.gather(
            self.fetcher.fetch_to_file(
                request.source_url, workdir, field="source_url", allowed_kinds=frozenset({"image"})
            ),
            self.fetcher.fetch_to_file(
                request.target_url, workdir, field="target_url", allowed_kinds=frozenset({"image", "video"})
            ),
        )
        return PreparedJob(
            task=task,
            workdir=workdir,
            inputs={"source": source.path, "target": target.path},
            metadata={
                "target_kind": target.kind,
                "target_content_type": target.content_type,
                "request": request,
            },
        )


class CpuFaceSwapEngine(FaceSwapEngineBase):
    """The embedded engine: MediaPipe landmarks, warp, colour transfer, seamless clone."""

    name = "cpu"

    def __init__(self, settings: Settings, fetcher: SafeFetcher | None = None) -> None:
        super().__init__(settings, fetcher)
        self._swapper: Any = None

    def _load(self) -> Any:
        if self._swapper is None:
            from gpu_runner.engines.cpu_swap import FaceSwapper

            self._swapper = FaceSwapper()
        return self._swapper

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    async def health(self) -> dict[str, Any]:
        try:
            await asyncio.to_thread(self._load)
        except Exception as exc:
            return {"status": "unavailable", "engine": self.name, "error": str(exc)}
        return {"status": "available", "engine": self.name, "models": ["face_detection", "face_landmark"]}

    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        request: FaceSwapInput = job.metadata["request"]
        if job.metadata["target_kind"] == "video":
            return await asyncio.to_thread(self._swap_video, job, request, progress, cancel)
        return await asyncio.to_thread(self._swap_image, job, request, progress, cancel)

    def _swap_image(
        self, job: PreparedJob, request: FaceSwapInput, progress: ProgressCallback, cancel: asyncio.Event
    ) -> EngineResult:
        from gpu_runner.engines.cpu_swap.resolution import parse_resolution

        swapper = self._load()
        source_image = _read_image(job.inputs["source"], "source_url")
        target_image = _read_image(job.inputs["target"], "target_url")
        progress(Progress(value=0, max=2, stage="source"))
        source_face = swapper.prepare_source(source_image)
        if cancel.is_set():
            raise JobCancelled("cancelled before the swap")
        progress(Progress(value=1, max=2, stage="swap"))
        result = swapper.swap_image(
            source_face,
            target_image,
            request.face_selector,
            output_size=parse_resolution(request.resolution),
        )
        is_png = job.metadata["target_content_type"] == "image/png"
        output_path = job.workdir / ("result.png" if is_png else "result.jpg")
        params = [] if is_png else [cv2.IMWRITE_JPEG_QUALITY, 95]
        if not cv2.imwrite(str(output_path), result, params):
            raise JobFailed("could not encode the result image", code="encode_failed")
        progress(Progress(value=2, max=2, stage="encode"))
        height, width = result.shape[:2]
        return EngineResult(
            outputs=[
                EngineOutput(
                    path=output_path,
                    content_type="image/png" if is_png else "image/jpeg",
                    kind="image",
                    width=int(width),
                    height=int(height),
                )
            ],
            metadata={"engine": self.name, "model": request.model},
        )

    def _swap_video(
        self, job: PreparedJob, request: FaceSwapInput, progress: ProgressCallback, cancel: asyncio.Event
    ) -> EngineResult:
        from gpu_runner.engines.cpu_swap import swap_video
        from gpu_runner.engines.cpu_swap.errors import SwapCancelled
        from gpu_runner.engines.cpu_swap.resolution import parse_resolution

        swapper = self._load()
        source_face = swapper.prepare_source(_read_image(job.inputs["source"], "source_url"))
        output_path = job.workdir / "result.mp4"

        def on_frames(done: int, total: int) -> None:
            progress(Progress(value=done, max=max(total, done, 1), stage="frames"))

        try:
            info = swap_video(
                swapper,
                source_face,
                job.inputs["target"],
                output_path,
                face_selector=request.face_selector,
                output_size=parse_resolution(request.resolution),
                progress=on_frames,
                should_stop=cancel.is_set,
            )
        except SwapCancelled:
            raise JobCancelled("cancelled between frames") from None
        return EngineResult(
            outputs=[
                EngineOutput(
                    path=output_path,
                    content_type="video/mp4",
                    kind="video",
                    width=info.width,
                    height=info.height,
                    duration=info.duration,
                    extra={"frames": info.frames, "fps": info.fps, "has_audio": info.has_audio},
                )
            ],
            metadata={"engine": self.name, "model": request.model},
        )


def _read_image(path: Path, field: str) -> np.ndarray[Any, Any]:
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise JobFailed(f"{field}: the file could not be decoded as an image", code="unsupported_media")
    return image


def make_face_swap_engine(settings: Settings) -> Engine:
    if settings.face_swap_engine == "cpu":
        return CpuFaceSwapEngine(settings)
    if settings.face_swap_engine == "facefusion":
        from gpu_runner.engines.facefusion import FaceFusionEngine

        return FaceFusionEngine(settings)
    from gpu_runner.engines.facefusion_api import FaceFusionApiEngine

    return FaceFusionApiEngine(settings)
