"""The runner's FaceFusion engine against the real FaceFusion 3.8.1 ``headless-run`` on CPU.

FaceFusion is the real program from ``make peers``; only its weights are stand-ins
(scripts/peers/facefusion_standin_models.py: FaceFusion's own file names, signatures and
``.hash`` files, a detector that finds one centred face, a swapper that visibly changes
it). Each test goes through the real engine: inputs fetched by the real SafeFetcher,
FaceFusion started in its own process group, its real output parsed.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
import pytest
from PIL import Image

from gpu_runner.engines.facefusion import FaceFusionEngine
from shared.errors import JobCancelled, JobFailed, UpstreamUnavailable
from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.tasks import Progress, Task
from tests.facefusion.conftest import data_url, face_swap_task
from tests.faceswap.media import GRACE_HOPPER_PATH, write_clip
from tests.peers import facefusion_peer
from tests.peers.conftest import require_peer

pytestmark = [pytest.mark.real_peer("facefusion"), pytest.mark.timeout(600)]

CLIP_FPS = 10
CLIP_FRAMES = 15


@pytest.fixture(autouse=True)
def _installed() -> None:
    require_peer(facefusion_peer.installed(), facefusion_peer.missing_reason())


@pytest.fixture
def fetcher() -> SafeFetcher:
    return SafeFetcher(max_bytes=50 << 20, timeout_s=10.0, max_image_pixels=40_000_000, allow_loopback=True)


@pytest.fixture(scope="module")
def source_url() -> str:
    return data_url(GRACE_HOPPER_PATH, "image/jpeg")


@pytest.fixture(scope="module")
def target_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.faceswap.media import astronaut_bgr

    path = tmp_path_factory.mktemp("target") / "astronaut.png"
    Image.fromarray(astronaut_bgr()[:, :, ::-1]).save(path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1.5 s clip of the astronaut with an AAC tone as long as the video."""
    path = tmp_path_factory.mktemp("clip") / "astronaut.mp4"
    write_clip(path, frame_count=CLIP_FRAMES, size=160, fps=CLIP_FPS)
    return path


MODES = ["warm", "cold"]


def make_engine(
    tmp_path: Path, fetcher: SafeFetcher, root: Path | None = None, *, mode: str = "warm", **overrides: Any
) -> FaceFusionEngine:
    """``warm``: jobs go to a warm FaceFusion host; ``cold``: one ``headless-run`` per job."""
    settings = Settings(
        data_dir=tmp_path / "data",
        facefusion_command=facefusion_peer.facefusion_command(root or facefusion_peer.FACEFUSION_DIR),
        facefusion_execution_providers="cpu",
        facefusion_warm=mode == "warm",
        **{"task_timeout_s": 300.0, **overrides},
    )
    return FaceFusionEngine(settings, fetcher)


class Run:
    def __init__(self, engine: FaceFusionEngine, task: Task, workdir: Path) -> None:
        self.engine, self.task, self.workdir = engine, task, workdir
        self.cancel = asyncio.Event()
        self.progress: list[Progress] = []

    async def __call__(self) -> Any:
        job = await self.engine.prepare(self.task, self.workdir)
        return await self.engine.run(job, self.progress.append, self.cancel)


def run_image(engine: FaceFusionEngine, workdir: Path, source_url: str, target: Path, **options: Any) -> Any:
    """One image job on ``engine``, its host (if any) closed afterwards."""
    task = face_swap_task(source_url=source_url, target_url=data_url(target, "image/png"), **options)

    async def once() -> Any:
        try:
            return await Run(engine, task, workdir)()
        finally:
            await engine.close()

    return asyncio.run(once())


def audio_duration(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert stream.duration is not None and stream.time_base is not None
        return float(stream.duration * stream.time_base)


def group_members(pgid: int) -> list[int]:
    members = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                members.append(process.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


@pytest.mark.parametrize("mode", MODES)
def test_an_image_swap_through_the_real_facefusion(
    tmp_path: Path, fetcher: SafeFetcher, source_url: str, target_png: Path, mode: str
) -> None:
    engine = make_engine(tmp_path, fetcher, mode=mode)
    task = face_swap_task(source_url=source_url, target_url=data_url(target_png, "image/png"))

    async def twice() -> Any:
        first = await Run(engine, task, tmp_path / "first")()
        second = await Run(engine, task, tmp_path / "second")()  # warm: the same host again
        await engine.close()
        assert first.outputs[0].path.read_bytes() == second.outputs[0].path.read_bytes()
        return second

    result = asyncio.run(twice())

    [output] = result.outputs
    assert output.content_type == "image/png"
    assert (output.width, output.height) == (512, 512)
    swapped = np.asarray(Image.open(output.path).convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(target_png).convert("RGB"), dtype=np.int16)
    centre, corner = np.s_[236:276, 236:276], np.s_[0:40, 0:40]
    assert np.abs(swapped[centre] - original[centre]).mean() > 20, "the centred face should be swapped"
    assert np.abs(swapped[corner] - original[corner]).mean() < 2, "away from the face nothing changes"
    assert result.metadata["pixel_boost"] == "128x128"


@pytest.mark.parametrize("mode", MODES)
def test_a_video_keeps_its_audio_and_reports_real_progress(
    tmp_path: Path, fetcher: SafeFetcher, source_url: str, clip: Path, mode: str
) -> None:
    engine = make_engine(tmp_path, fetcher, mode=mode)
    run = Run(
        engine, face_swap_task(source_url=source_url, target_url=data_url(clip, "video/mp4")), tmp_path / "w"
    )

    async def once() -> Any:
        try:
            return await run()
        finally:
            await engine.close()

    result = asyncio.run(once())

    [output] = result.outputs
    assert output.kind == "video"
    assert output.extra["has_audio"] is True, "FaceFusion's default (flac) would drop the audio from MP4"
    assert audio_duration(output.path) == pytest.approx(audio_duration(clip), abs=0.05)
    with av.open(str(output.path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == CLIP_FRAMES
    stages = [item.stage for item in run.progress]
    assert "analysing" in stages
    processing = [item for item in run.progress if item.stage == "processing"]
    assert processing[-1] == Progress(value=CLIP_FRAMES, max=CLIP_FRAMES, stage="processing")
    assert [item.value for item in processing] == sorted(item.value for item in processing)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stop", ["cancel", "timeout"])
def test_cancel_and_timeout_kill_the_whole_process_group(
    tmp_path: Path, fetcher: SafeFetcher, source_url: str, stop: str, mode: str
) -> None:
    # A long clip, so that FaceFusion is still working when it is stopped: a quiet machine
    # swaps 600 frames of 160 px inside the 20 s timeout, so the timeout cases get 1,800.
    long_clip = tmp_path / "long.mp4"
    write_clip(long_clip, frame_count=600 if stop == "cancel" else 1800, size=160, fps=CLIP_FPS)
    engine = make_engine(tmp_path, fetcher, mode=mode, task_timeout_s=300.0 if stop == "cancel" else 20.0)
    run = Run(
        engine,
        face_swap_task(source_url=source_url, target_url=data_url(long_clip, "video/mp4")),
        tmp_path / "w",
    )
    started: set[int] = set()
    # Children that were there before the job (the session's real ComfyUI, emulators started
    # by earlier tests) are not FaceFusion's and outlive it by design.
    already_running = {child.pid for child in psutil.Process().children(recursive=True)}

    async def scenario() -> BaseException:
        job = asyncio.ensure_future(run())
        deadline = time.monotonic() + 240
        # Cancel once FaceFusion reports progress; a timeout comes by itself.
        while stop == "timeout" or not any(
            item.stage in ("analysing", "processing") for item in run.progress
        ):
            assert time.monotonic() < deadline, "FaceFusion never reported progress"
            started.update(child.pid for child in psutil.Process().children(recursive=True))
            started.difference_update(already_running)
            if job.done():
                break
            await asyncio.sleep(0.1)
        if stop == "cancel":
            started.update(child.pid for child in psutil.Process().children(recursive=True))
            started.difference_update(already_running)
            run.cancel.set()
        try:
            await job
        except (JobCancelled, JobFailed) as exc:
            return exc
        finally:
            await engine.close()
        raise AssertionError("the job was not stopped")

    stopped = asyncio.run(scenario())

    if stop == "cancel":
        assert isinstance(stopped, JobCancelled)
    else:
        assert isinstance(stopped, JobFailed) and stopped.code == "task_timeout"
    assert started, "FaceFusion's process was not seen"
    deadline = time.monotonic() + 10
    while any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in started
    ):
        assert time.monotonic() < deadline, "a FaceFusion process outlived the stop"
        time.sleep(0.1)
    assert not any(group_members(pid) for pid in started)


def test_missing_weights_fail_fast_as_models_missing_before_facefusion_starts(
    tmp_path: Path, fetcher: SafeFetcher, source_url: str, target_png: Path
) -> None:
    root = facefusion_peer.private_root(tmp_path, without=["nsfw_1", "inswapper_128_fp16"])
    engine = make_engine(tmp_path, fetcher, root)
    asyncio.run(engine.start())

    with pytest.raises(UpstreamUnavailable) as failure:
        run_image(engine, tmp_path / "w", source_url, target_png)

    assert failure.value.code == "models_missing"
    assert failure.value.details["models"] == ["inswapper_128_fp16", "nsfw_1"]
    health = asyncio.run(engine.health())
    assert health["status"] == "unavailable" and health["models_missing"] == ["inswapper_128_fp16", "nsfw_1"]
    assert engine.accepting_work is False


def test_facefusions_own_hash_failure_is_models_missing_and_never_a_download_wait(
    tmp_path: Path, fetcher: SafeFetcher, source_url: str, target_png: Path
) -> None:
    """The engine's check passes (it reads a complete folder) but FaceFusion's own folder
    lacks a file: the real FaceFusion tries to download it, which must fail at once."""
    root = facefusion_peer.private_root(tmp_path, without=["fairface"])
    engine = make_engine(tmp_path, fetcher, root, facefusion_models_dir=str(facefusion_peer.MODELS_DIR))
    started = time.monotonic()

    with pytest.raises(UpstreamUnavailable) as failure:
        run_image(engine, tmp_path / "w", source_url, target_png)

    assert failure.value.code == "models_missing"
    assert failure.value.details["models"] == ["fairface"]
    assert failure.value.details["exit_code"] == 1
    assert time.monotonic() - started < 120, "FaceFusion waited on a download"


def test_progress_from_the_real_output_reaches_the_task_and_the_result_is_stored(
    tmp_path: Path, fetcher: SafeFetcher, source_url: str
) -> None:
    """The whole runner path: the real worker claims from the real SQLite store, runs the
    real FaceFusion, writes its progress to the task while it runs, uploads the result."""
    from gpu_runner.worker import StoreTaskSource, Worker
    from shared.storage.local import LocalStorage
    from shared.store.sqlite import SQLiteTaskStore
    from shared.tasks import TaskStatus

    # On a quiet machine FaceFusion swapped 60 frames inside the default 2 s progress
    # interval, so no progress was ever written: a longer clip, progress every 0.2 s.
    longer_clip = tmp_path / "clip.mp4"
    write_clip(longer_clip, frame_count=240, size=160, fps=CLIP_FPS)
    engine = make_engine(tmp_path, fetcher, progress_interval_s=0.2)
    store = SQLiteTaskStore(tmp_path / "tasks.db")
    results = LocalStorage(tmp_path / "results", "http://127.0.0.1:9/results")
    worker = Worker(
        engine.settings,
        store,
        {"face_swap": engine},
        results.upload_file,
        source=StoreTaskSource(store, engine.settings),
    )
    task = store.create(face_swap_task(source_url=source_url, target_url=data_url(longer_clip, "video/mp4")))
    seen: list[tuple[TaskStatus, Any]] = []

    async def scenario() -> Task:
        await engine.start()
        loop_task = asyncio.create_task(worker.run_pull_loop(wait_s=0.5))
        deadline = time.monotonic() + 400
        current = store.get_or_raise(task.taskId)
        while not current.is_terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            current = store.get_or_raise(task.taskId)
            seen.append((current.status, current.progress))
        await worker.drain(grace_s=1.0)
        loop_task.cancel()
        return current

    final = asyncio.run(scenario())

    assert final.status == TaskStatus.COMPLETED, final.error
    stages = {progress.stage for status, progress in seen if status == TaskStatus.PROCESSING and progress}
    assert "processing" in stages, f"FaceFusion's progress never reached the task: {stages}"
    assert final.output_data is not None


@pytest.mark.parametrize(
    ("target", "face_selector", "faces_found"),
    [("astronaut", 1, 1), ("black", "largest", None), ("black", 0, 0)],
)
def test_no_face_and_a_face_index_past_the_last_fail_as_on_the_cpu_engine(
    tmp_path: Path,
    fetcher: SafeFetcher,
    source_url: str,
    target_png: Path,
    target: str,
    face_selector: str | int,
    faces_found: int | None,
) -> None:
    """FaceFusion itself would swap the last face for an index past it, and return the
    target unchanged (exit 0) without a face: the warm host reports both, with the CPU
    engine's code (the stand-in detector finds one face in any picture that is not black)."""
    if target == "black":
        target_png = tmp_path / "black.png"
        Image.new("RGB", (256, 256)).save(target_png)
    engine = make_engine(tmp_path, fetcher)

    with pytest.raises(JobFailed) as failure:
        run_image(engine, tmp_path / "w", source_url, target_png, face_selector=face_selector)

    assert failure.value.code == "no_face_in_target"
    assert failure.value.retryable is False
    assert failure.value.details.get("faces_found") == faces_found


def test_a_dead_host_is_replaced_and_the_next_job_runs(
    tmp_path: Path, fetcher: SafeFetcher, source_url: str, target_png: Path
) -> None:
    engine = make_engine(tmp_path, fetcher)
    task = face_swap_task(source_url=source_url, target_url=data_url(target_png, "image/png"))

    async def scenario() -> tuple[int, int]:
        try:
            await Run(engine, task, tmp_path / "first")()
            [host] = engine._pool._idle
            first_pid = host.process.pid
            host.kill()  # as the OOM killer would
            await host.process.wait()
            await Run(engine, task, tmp_path / "second")()
            [replacement] = engine._pool._idle
            return first_pid, replacement.process.pid
        finally:
            await engine.close()

    first_pid, second_pid = asyncio.run(scenario())

    assert second_pid != first_pid


def test_a_host_grown_past_its_memory_limit_is_replaced_after_its_job(
    tmp_path: Path, fetcher: SafeFetcher, source_url: str, target_png: Path
) -> None:
    engine = make_engine(tmp_path, fetcher, facefusion_warm_max_rss_mb=1.0)  # every host is "too big"
    task = face_swap_task(source_url=source_url, target_url=data_url(target_png, "image/png"))

    async def scenario() -> tuple[list[int], Any]:
        try:
            result = await Run(engine, task, tmp_path / "first")()
            return [host.process.pid for host in engine._pool._idle], result
        finally:
            await engine.close()

    idle, result = asyncio.run(scenario())

    assert result.outputs[0].path.is_file(), "the job itself completes"
    assert idle == [], "the host was closed instead of kept for the next job"
