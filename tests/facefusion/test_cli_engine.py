"""FaceFusionEngine against the stand-in of FaceFusion's ``headless-run`` CLI.

Each test runs the real engine: inputs fetched by the real SafeFetcher from data: URLs
of real photos, FaceFusion started as a subprocess in its own process group, its output
parsed. The stand-in records the arguments it was given, so the mapping from our request
to FaceFusion's options is asserted on what a real FaceFusion would have received.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import psutil
import pytest
from PIL import Image

from gpu_runner.engines.facefusion import FaceFusionEngine, FaceFusionProgressParser
from shared.errors import ComfySwapError, JobCancelled, JobFailed, UpstreamUnavailable
from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.tasks import Progress
from tests.servers import wait_until

from .conftest import CLIP_FPS, CLIP_FRAMES, FAKE_CLI, FAKES, Run, face_swap_task, write_model_files

pytestmark = pytest.mark.timeout(60)


def make_engine(tmp_path: Path, fetcher: SafeFetcher, command: str, **overrides: Any) -> FaceFusionEngine:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "facefusion_command": command,
        "facefusion_models_dir": str(write_model_files(tmp_path / "models")),
        # The stand-in is a script, not FaceFusion: no warm host (tests/peers runs one).
        "facefusion_warm": False,
        "facefusion_execution_providers": "cuda",
        "task_timeout_s": 30.0,
        **overrides,
    }
    settings = Settings(**values)
    return FaceFusionEngine(settings, fetcher)


@pytest.fixture
def cli_engine(
    tmp_path: Path, fetcher: SafeFetcher, fake_cli_command: str
) -> Callable[..., FaceFusionEngine]:
    """``cli_engine(**settings)``: an engine on the stand-in CLI (make_engine's defaults)."""
    return functools.partial(make_engine, tmp_path, fetcher, fake_cli_command)


@pytest.fixture
def record_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "facefusion-record.json"
    monkeypatch.setenv("FAKE_FACEFUSION_RECORD", str(path))
    return path


@pytest.fixture
def hanging_facefusion(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in (and the child it starts) sleeps a minute instead of swapping."""
    monkeypatch.setenv("FAKE_FACEFUSION_SLEEP_S", "60")


def assert_no_facefusion_left(record_path: Path) -> None:
    """FaceFusion and its child, as the stand-in recorded them, are gone within 5 s."""
    record = json.loads(record_path.read_text())
    wait_until(lambda: gone(record["pid"]) and gone(record["child_pid"]), timeout_s=5, what="no process left")


def options(argv: list[str]) -> dict[str, list[str]]:
    """``--name value...`` pairs of a recorded command line (after ``headless-run``)."""
    parsed: dict[str, list[str]] = {}
    name = ""
    for part in argv[1:]:
        if part.startswith("-"):
            name = part
            parsed[name] = []
        else:
            parsed[name].append(part)
    return parsed


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_image_swap_maps_the_request_to_headless_run_arguments(
    image_run: Callable[..., Run],
    cli_engine: Callable[..., FaceFusionEngine],
    tmp_path: Path,
    record_path: Path,
    astronaut_png: Path,
) -> None:
    engine = cli_engine()
    run = image_run(engine)

    result = run()

    record = json.loads(record_path.read_text())
    argv = record["argv"]
    assert argv[0] == "headless-run"
    given = options(argv)
    assert run.job is not None
    assert given["--source-paths"] == [str(run.job.inputs["source"])]
    assert given["--target-path"] == [str(run.job.inputs["target"])]
    assert given["--output-path"] == [str(tmp_path / "work" / "result.png")]
    assert given["--processors"] == ["face_swapper"]
    assert given["--face-swapper-model"] == ["inswapper_128_fp16"]
    # FaceFusion's own default (the model's size), not the output resolution 1024x1024.
    assert given["--face-swapper-pixel-boost"] == ["128x128"]
    assert given["--face-selector-mode"] == ["one"]
    assert given["--face-selector-order"] == ["large-small"]
    assert given["--execution-providers"] == ["cuda"]
    assert given["--log-level"] == ["info"]
    assert given["--output-image-quality"] == ["95"]
    assert not {"--trim-frame-start", "--trim-frame-end", "--output-video-encoder"} & set(given)
    # FaceFusion finds its processors relative to its folder; its temp files stay in the job's.
    assert Path(record["cwd"]) == FAKES
    assert Path(record["tmpdir"]).is_relative_to(tmp_path / "work")
    assert Path(given["--jobs-path"][0]).is_relative_to(tmp_path / "work")

    [output] = result.outputs
    assert output.content_type == "image/png"
    assert output.kind == "image"
    assert (output.width, output.height) == (512, 512)
    swapped = np.asarray(Image.open(output.path).convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(astronaut_png).convert("RGB"), dtype=np.int16)
    centre = np.s_[200:312, 200:312]
    assert np.abs(swapped[centre] - original[centre]).mean() > 20, "the centre should have changed"
    assert result.metadata["pixel_boost"] == "128x128"
    assert run.progress[0].stage == "starting"
    assert run.progress[-1] == Progress(value=1, max=1, stage="finished")


def test_video_swap_keeps_fps_and_audio_and_reports_frame_progress(
    video_run: Callable[..., Run],
    cli_engine: Callable[..., FaceFusionEngine],
    tmp_path: Path,
    record_path: Path,
) -> None:
    engine = cli_engine(facefusion_execution_providers="tensorrt, cuda")
    run = video_run(engine, resolution="640x480", model="simswap_256", face_selector="all")

    result = run()

    given = options(json.loads(record_path.read_text())["argv"])
    assert given["--output-path"] == [str(tmp_path / "work" / "result.mp4")]
    assert given["--face-swapper-model"] == ["simswap_256"]
    assert given["--face-swapper-pixel-boost"] == ["256x256"]
    assert given["--face-selector-mode"] == ["many"]
    assert given["--execution-providers"] == ["tensorrt", "cuda"]
    assert given["--output-video-encoder"] == ["libx264"]
    assert given["--output-audio-encoder"] == ["aac"]  # FaceFusion's default, flac, drops it in MP4
    assert "--output-video-scale" not in given  # the 160 px clip fits 640x480: never upscaled
    assert given["--output-video-quality"] == ["80"]
    assert given["--output-video-fps"] == [str(CLIP_FPS)]
    assert "--output-image-quality" not in given

    [output] = result.outputs
    assert output.content_type == "video/mp4"
    assert output.kind == "video"
    assert output.extra["has_audio"] is True
    assert output.extra["audio_duration"] == pytest.approx(CLIP_FRAMES / CLIP_FPS, abs=0.05)
    assert output.extra["fps"] == CLIP_FPS
    with av.open(str(output.path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == CLIP_FRAMES
    processing = [item for item in run.progress if item.stage == "processing"]
    assert processing[-1] == Progress(value=CLIP_FRAMES, max=CLIP_FRAMES, stage="processing")
    assert [item.value for item in processing] == sorted(item.value for item in processing)
    assert any(item.stage == "analysing" for item in run.progress)


def test_resolution_is_the_output_size_and_pixel_boost_its_own_parameter(
    cli_engine: Callable[..., FaceFusionEngine],
    tmp_path: Path,
    record_path: Path,
    source_url: str,
    target_image_url: str,
    target_video_url: str,
) -> None:
    engine = cli_engine()
    image_task = face_swap_task(
        source_url=source_url, target_url=target_image_url, resolution="256x200", pixel_boost="512x512"
    )

    image_result = Run(engine, image_task, tmp_path / "image")()

    given = options(json.loads(record_path.read_text())["argv"])
    assert given["--face-swapper-pixel-boost"] == ["512x512"]
    [image] = image_result.outputs
    assert (image.width, image.height) == (200, 200)  # the 512 px square fitted in 256x200
    assert image_result.metadata["pixel_boost"] == "512x512"

    record_path.unlink()
    video_task = face_swap_task(source_url=source_url, target_url=target_video_url, resolution="100x120")
    video_result = Run(engine, video_task, tmp_path / "video")()

    given = options(json.loads(record_path.read_text())["argv"])
    assert given["--output-video-scale"] == ["0.5"]  # 100/160 floored to FaceFusion's 0.25 steps
    [video] = video_result.outputs
    assert (video.width, video.height) == (80, 80)


def test_a_reference_index_selects_that_face_as_reference(
    image_run: Callable[..., Run], cli_engine: Callable[..., FaceFusionEngine], record_path: Path
) -> None:
    image_run(cli_engine(), face_selector=2, resolution="200x200")()

    given = options(json.loads(record_path.read_text())["argv"])
    assert given["--face-selector-mode"] == ["reference"]
    assert given["--face-selector-order"] == ["large-small"]
    assert given["--reference-face-position"] == ["2"]
    assert given["--face-swapper-pixel-boost"] == ["128x128"]


@dataclasses.dataclass(frozen=True)
class Failure:
    """How a FaceFusion failure must reach the task: the error, its code and retryability,
    a part of its message, details it must carry, a part of FaceFusion's last output line."""

    error: type[ComfySwapError]
    code: str
    message: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_line: str = ""


# Case -> (the stand-in's FAKE_FACEFUSION_FAIL knob, settings, a video target?, the failure).
FAILURES: dict[str, tuple[str, dict[str, Any], bool, Failure]] = {
    "exit 1 mid-video: FaceFusion's last lines and progress": (
        "midway",
        {},
        True,
        Failure(
            JobFailed,
            "facefusion_failed",
            "processing to video failed",
            {
                "exit_code": 1,
                "last_progress": {"value": CLIP_FRAMES // 2, "max": CLIP_FRAMES, "stage": "processing"},
            },
        ),
    ),
    "no source face: the CPU engine's code": (
        "no_source_face",
        {},
        False,
        Failure(JobFailed, "no_face_in_source", last_line="no source face detected"),
    ),
    "exit 2: a failed precheck": (
        "precheck",
        {},
        False,
        Failure(JobFailed, "facefusion_precheck_failed", "ffmpeg is not installed", {"exit_code": 2}),
    ),
    "an option FaceFusion refuses: a failed precheck naming it": (
        "",
        {"facefusion_execution_providers": "quantum"},
        False,
        Failure(JobFailed, "facefusion_precheck_failed", "invalid choice: 'quantum'"),
    ),
    "exit 0 without an output file: a failed job": (
        "no_output",
        {},
        False,
        Failure(JobFailed, "facefusion_no_output"),
    ),
    "a hash failure FaceFusion reports: models missing, not the user's fault": (
        "hash",
        {},
        False,
        Failure(UpstreamUnavailable, "models_missing", details={"models": ["nsfw_1"]}),
    ),
}


@pytest.mark.parametrize(("knob", "settings", "video", "expected"), FAILURES.values(), ids=FAILURES.keys())
def test_facefusion_failures_reach_the_task_as_what_they_are(
    image_run: Callable[..., Run],
    video_run: Callable[..., Run],
    cli_engine: Callable[..., FaceFusionEngine],
    monkeypatch: pytest.MonkeyPatch,
    knob: str,
    settings: dict[str, Any],
    video: bool,
    expected: Failure,
) -> None:
    if knob:
        monkeypatch.setenv("FAKE_FACEFUSION_FAIL", knob)
    run = (video_run if video else image_run)(cli_engine(**settings))

    with pytest.raises(ComfySwapError) as failure:
        run()

    error = failure.value
    assert type(error) is expected.error, error
    assert error.code == expected.code
    assert error.retryable is (expected.error is UpstreamUnavailable)
    assert expected.message in error.message
    assert {key: error.details.get(key) for key in expected.details} == expected.details
    if expected.last_line:
        assert expected.last_line in error.details["output_tail"][-1]


def test_a_model_facefusion_does_not_have_fails_before_starting_it(
    image_run: Callable[..., Run], cli_engine: Callable[..., FaceFusionEngine], record_path: Path
) -> None:
    with pytest.raises(JobFailed) as failure:
        image_run(cli_engine(), model="simswap_512")()

    assert failure.value.code == "model_not_supported"
    assert not record_path.exists()


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_missing_or_corrupt_models_are_a_deployment_fault_before_facefusion_starts(
    image_run: Callable[..., Run],
    cli_engine: Callable[..., FaceFusionEngine],
    tmp_path: Path,
    record_path: Path,
    fault: str,
) -> None:
    engine = cli_engine()
    models = tmp_path / "models"
    if fault == "missing":
        (models / "yoloface_8n.onnx").unlink()
        (models / "inswapper_128_fp16.hash").unlink()
    else:
        with (models / "yoloface_8n.onnx").open("ab") as model:
            model.write(b"truncated download")
        (models / "inswapper_128_fp16.hash").write_text("00000000")
    asyncio.run(engine.start())
    run = image_run(engine)

    with pytest.raises(UpstreamUnavailable) as failure:
        run()

    assert failure.value.code == "models_missing"
    assert failure.value.retryable is True
    assert failure.value.details["models"] == ["inswapper_128_fp16", "yoloface_8n"]
    assert "yoloface_8n" in failure.value.message and "deployment" in failure.value.message
    assert not record_path.exists(), "FaceFusion must not start (it would try to download)"
    health = asyncio.run(engine.health())
    assert health["status"] == "unavailable"
    assert health["models_missing"] == ["inswapper_128_fp16", "yoloface_8n"]
    assert engine.accepting_work is False

    write_model_files(models, ["yoloface_8n", "inswapper_128_fp16"])
    assert asyncio.run(engine.health())["status"] == "available"
    assert engine.accepting_work is True


def test_a_missing_swapper_alone_fails_only_its_tasks(
    image_run: Callable[..., Run], cli_engine: Callable[..., FaceFusionEngine], tmp_path: Path
) -> None:
    engine = cli_engine()
    (tmp_path / "models" / "crossface_simswap.onnx").unlink()

    health = asyncio.run(engine.health())

    assert health["status"] == "available"
    assert health["models_missing"] == ["crossface_simswap"]
    assert "simswap_256" not in health["models"] and "inswapper_128_fp16" in health["models"]
    assert engine.accepting_work is True
    with pytest.raises(UpstreamUnavailable) as failure:
        image_run(engine, model="simswap_256")()
    assert failure.value.details["models"] == ["crossface_simswap"]


def test_facefusion_cannot_download_models(tmp_path: Path) -> None:
    from gpu_runner.engines.facefusion_cli import facefusion_environment

    environment = facefusion_environment(tmp_path)

    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "ALL_PROXY"):
        assert environment[variable] == "http://127.0.0.1:9"
    assert "NO_PROXY" not in environment and "no_proxy" not in environment
    assert environment["TMPDIR"] == str(tmp_path)


def test_timeout_kills_facefusion_and_its_children(
    image_run: Callable[..., Run],
    cli_engine: Callable[..., FaceFusionEngine],
    record_path: Path,
    hanging_facefusion: None,
) -> None:
    engine = cli_engine(task_timeout_s=1.5)
    run = image_run(engine)
    started = time.monotonic()

    with pytest.raises(JobFailed) as failure:
        run()

    assert failure.value.code == "task_timeout"
    assert time.monotonic() - started < 10
    assert_no_facefusion_left(record_path)


def test_cancel_stops_facefusion_mid_run_and_leaves_no_process(
    video_run: Callable[..., Run],
    cli_engine: Callable[..., FaceFusionEngine],
    record_path: Path,
    hanging_facefusion: None,
) -> None:
    engine = cli_engine()
    run = video_run(engine)

    async def cancel_once_processing() -> None:
        job = asyncio.ensure_future(run.prepare_and_run())
        deadline = time.monotonic() + 20
        while "child_pid" not in (json.loads(record_path.read_text()) if record_path.exists() else {}):
            assert time.monotonic() < deadline, "FaceFusion never started processing"
            assert not job.done(), job.result()
            await asyncio.sleep(0.05)
        started = time.monotonic()
        run.cancel.set()
        with pytest.raises(JobCancelled):
            await job
        assert time.monotonic() - started < 3

    asyncio.run(cancel_once_processing())

    assert_no_facefusion_left(record_path)
    assert any(item.stage == "processing" for item in run.progress), "progress was read before the cancel"


def test_when_the_worker_abandons_the_run_facefusion_is_killed(
    image_run: Callable[..., Run],
    cli_engine: Callable[..., FaceFusionEngine],
    record_path: Path,
    hanging_facefusion: None,
) -> None:
    """The worker's own TASK_TIMEOUT_S cancels ``run``: the process must not outlive it."""
    engine = cli_engine()
    run = image_run(engine)

    async def abandon() -> None:
        job = await engine.prepare(run.task, run.workdir)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(engine.run(job, run.progress.append, run.cancel), timeout=1.5)

    asyncio.run(abandon())

    assert_no_facefusion_left(record_path)


@pytest.mark.parametrize(
    "command", ["/nonexistent/bin/facefusion", f"{sys.executable} /nonexistent/facefusion.py"]
)
def test_a_missing_facefusion_is_upstream_unavailable(
    image_run: Callable[..., Run],
    tmp_path: Path,
    fetcher: SafeFetcher,
    command: str,
) -> None:
    engine = make_engine(tmp_path, fetcher, command)
    run = image_run(engine)

    with pytest.raises(UpstreamUnavailable) as failure:
        run()

    assert failure.value.code == "facefusion_unavailable"
    assert failure.value.retryable is True
    assert asyncio.run(engine.health())["status"] == "unavailable"


def test_health_reports_an_installed_facefusion(cli_engine: Callable[..., FaceFusionEngine]) -> None:
    health = asyncio.run(cli_engine().health())

    assert health["status"] == "available"
    assert health["execution_providers"] == ["cuda"]
    assert "inswapper_128_fp16" in health["models"]


def test_the_progress_parser_reads_real_tqdm_output() -> None:
    """The parser is checked against tqdm itself, configured as FaceFusion configures it."""
    tqdm = pytest.importorskip("tqdm").tqdm
    stream = io.StringIO()
    with tqdm(
        total=7, desc="processing", unit="frame", ascii=" =", file=stream, mininterval=0, miniters=1
    ) as bar:
        bar.set_postfix(execution_providers=["cuda"])
        for _ in range(7):
            bar.update()
    seen: list[Progress] = []
    parser = FaceFusionProgressParser(seen.append)

    for start in range(0, len(stream.getvalue()), 13):  # arbitrary chunking, as a pipe delivers
        parser.feed(stream.getvalue()[start : start + 13])
    parser.feed("[FACEFUSION.CORE] processing step 1 of 1\n")
    parser.close()

    assert seen[-1] == Progress(value=7, max=7, stage="processing")
    assert [item.value for item in seen] == sorted(item.value for item in seen)
    assert list(parser.tail) == ["[FACEFUSION.CORE] processing step 1 of 1"]


def test_bars_never_fill_the_error_tail_and_3_3s_capitals_are_read() -> None:
    seen: list[Progress] = []
    parser = FaceFusionProgressParser(seen.append)

    parser.feed("Processing:  50%|=====     | 5/10 [00:01<00:01,  4.1frame/s]\r")
    parser.feed("downloading:  12%|=         | 1.50M/12.3M [00:01<00:09, 1.2MB/s]\r" * 40)
    parser.feed("streaming: 3frame [00:01, 2.9frame/s]\n")
    parser.feed("[FACEFUSION.DOWNLOAD] validating hash for yoloface_8n failed\n")
    parser.close()

    assert seen == [Progress(value=5, max=10, stage="processing")]
    assert list(parser.tail) == [
        "streaming: 3frame [00:01, 2.9frame/s]",
        "[FACEFUSION.DOWNLOAD] validating hash for yoloface_8n failed",
    ]
    assert parser.failed_hashes == ["yoloface_8n"]


def test_the_stand_in_refuses_unknown_processors_and_models_as_facefusion_does() -> None:
    for bad in (["--processors", "face_melter"], ["--face-swapper-model", "simswap_512"]):
        completed = subprocess.run(
            [sys.executable, str(FAKE_CLI), "headless-run", *bad],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert completed.returncode == 2
        assert "invalid choice" in completed.stderr
