"""FaceFusionApiEngine against a stand-in of the seed's FaceFusion HTTP service on 127.0.0.1.

The service runs as a real server in its own process; each test sets its failure knobs
over HTTP and reads back the calls it received.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpu_runner.engines.facefusion_api import FaceFusionApiEngine, resolve_output_path
from shared.errors import JobCancelled, JobFailed, UpstreamUnavailable
from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.tasks import Progress
from tests.servers import ServerProcess, free_port

from .conftest import Run, face_swap_task, received, set_knobs

pytestmark = pytest.mark.timeout(60)

BACKOFF_S = 0.1


@pytest.fixture(autouse=True)
def _fresh_service(api_server: ServerProcess) -> None:
    set_knobs(api_server)


def make_engine(
    tmp_path: Path, fetcher: SafeFetcher, url: str, shared_dir: Path, **overrides: Any
) -> FaceFusionApiEngine:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "face_swap_api_url": url,
        "face_swap_shared_dir": str(shared_dir),
        "face_swap_timeout": 10.0,
        "face_swap_retry_count": 3,
        **overrides,
    }
    return FaceFusionApiEngine(Settings(**values), fetcher, backoff_base_s=BACKOFF_S)


@pytest.fixture
def api_engine(
    tmp_path: Path, fetcher: SafeFetcher, api_server: ServerProcess, shared_dir: Path
) -> Callable[..., FaceFusionApiEngine]:
    """``api_engine(**settings)``: an engine on the stand-in service (make_engine's defaults)."""
    return functools.partial(make_engine, tmp_path, fetcher, api_server.url, shared_dir)


@pytest.fixture
def engine(api_engine: Callable[..., FaceFusionApiEngine]) -> FaceFusionApiEngine:
    return api_engine()


def test_image_swap_sends_the_seed_request_and_takes_the_result_from_the_shared_dir(
    engine: FaceFusionApiEngine,
    api_server: ServerProcess,
    shared_dir: Path,
    tmp_path: Path,
    source_url: str,
    target_image_url: str,
    astronaut_png: Path,
) -> None:
    task = face_swap_task(source_url=source_url, target_url=target_image_url, resolution="512x512")
    run = Run(engine, task, tmp_path / "work")

    result = run()

    [call] = received(api_server)
    assert call["body"] == {
        "source_url": source_url,
        "target_url": target_image_url,
        "resolution": "512x512",
        "model": "inswapper_128_fp16",
    }
    [output] = result.outputs
    assert output.content_type == "image/jpeg"
    assert output.kind == "image"
    assert output.path.parent == tmp_path / "work"
    assert (output.width, output.height) == (512, 512)
    swapped = np.asarray(Image.open(output.path).convert("RGB"), dtype=np.int16)
    original = np.asarray(Image.open(astronaut_png).convert("RGB"), dtype=np.int16)
    assert np.abs(swapped[200:312, 200:312] - original[200:312, 200:312]).mean() > 20
    assert not list((shared_dir / "outputs").glob("*.jpg")), "the result is moved out of the shared folder"
    assert result.metadata["upstream_job_id"]
    assert run.progress[-1] == Progress(value=2, max=2, stage="finished")


def test_a_video_result_is_stored_as_mp4(
    engine: FaceFusionApiEngine, tmp_path: Path, source_url: str, target_video_url: str
) -> None:
    result = Run(
        engine, face_swap_task(source_url=source_url, target_url=target_video_url), tmp_path / "work"
    )()

    [output] = result.outputs
    assert output.content_type == "video/mp4"
    assert output.kind == "video"
    assert output.path.suffix == ".mp4"
    assert output.extra["has_audio"] is True


def test_5xx_answers_are_retried_with_exponential_backoff(
    image_run: Callable[..., Run],
    engine: FaceFusionApiEngine,
    api_server: ServerProcess,
) -> None:
    set_knobs(api_server, fail_times=2)

    result = image_run(engine)()

    assert result.outputs
    arrivals = [call["at"] for call in received(api_server)]
    assert len(arrivals) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert gaps[0] >= BACKOFF_S * 0.9
    assert gaps[1] >= 2 * BACKOFF_S * 0.9


def test_a_timed_out_attempt_is_retried(
    api_engine: Callable[..., FaceFusionApiEngine],
    image_run: Callable[..., Run],
    api_server: ServerProcess,
) -> None:
    engine = api_engine(face_swap_timeout=0.5)
    set_knobs(api_server, slow_times=1, delay_s=3)

    result = image_run(engine)()

    assert result.outputs
    assert len(received(api_server)) == 2


def test_exhausted_retries_are_upstream_unavailable_and_retryable(
    image_run: Callable[..., Run],
    engine: FaceFusionApiEngine,
    api_server: ServerProcess,
) -> None:
    set_knobs(api_server, fail_times=10)
    run = image_run(engine)

    with pytest.raises(UpstreamUnavailable) as failure:
        run()

    assert failure.value.code == "facefusion_unavailable"
    assert failure.value.retryable is True
    assert "HTTP 503" in failure.value.message
    assert failure.value.details["attempts"] == 3
    assert len(received(api_server)) == 3


def test_timeouts_on_every_attempt_are_upstream_unavailable(
    api_engine: Callable[..., FaceFusionApiEngine],
    image_run: Callable[..., Run],
    api_server: ServerProcess,
) -> None:
    engine = api_engine(face_swap_timeout=0.3, face_swap_retry_count=2)
    set_knobs(api_server, slow_times=5, delay_s=3)
    run = image_run(engine)

    with pytest.raises(UpstreamUnavailable) as failure:
        run()

    assert "FACE_SWAP_TIMEOUT=0.3s" in failure.value.message


@pytest.mark.parametrize(
    ("upstream_error", "code"),
    [
        ("no source face detected", "no_face_in_source"),
        ("no face detected in target", "no_face_in_target"),
        ("CUDA out of memory", "facefusion_failed"),
    ],
)
def test_status_failed_is_a_failed_job_with_the_services_error(
    image_run: Callable[..., Run],
    engine: FaceFusionApiEngine,
    api_server: ServerProcess,
    upstream_error: str,
    code: str,
) -> None:
    """A missing face gets the code the CPU and FaceFusion engines give it."""
    set_knobs(api_server, result_status="failed", result_error=upstream_error)
    run = image_run(engine)

    with pytest.raises(JobFailed) as failure:
        run()

    assert failure.value.code == code
    assert failure.value.retryable is False
    assert upstream_error in failure.value.message
    assert len(received(api_server)) == 1, "a failed swap is not retried"


@pytest.mark.parametrize(
    "output_path",
    ["/../../../../etc/hostname", "outputs/../../escape.jpg", "/etc/hostname", "/outputs/escape-link.jpg"],
)
def test_an_output_path_outside_the_shared_dir_is_refused(
    image_run: Callable[..., Run],
    engine: FaceFusionApiEngine,
    api_server: ServerProcess,
    shared_dir: Path,
    tmp_path: Path,
    output_path: str,
) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"secret")
    (shared_dir / "outputs").mkdir(exist_ok=True)
    link = shared_dir / "outputs" / "escape-link.jpg"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    set_knobs(api_server, output_path=output_path)
    run = image_run(engine)

    with pytest.raises(JobFailed) as failure:
        run()

    assert failure.value.code == "unsafe_output_path"
    assert outside.read_bytes() == b"secret"
    assert not list((tmp_path / "work").glob("result*"))


def test_health_down_is_upstream_unavailable_before_any_swap(
    image_run: Callable[..., Run],
    engine: FaceFusionApiEngine,
    api_server: ServerProcess,
) -> None:
    set_knobs(api_server, health_down=True)
    run = image_run(engine)

    with pytest.raises(UpstreamUnavailable) as failure:
        run()

    assert failure.value.code == "facefusion_unavailable"
    assert "503" in failure.value.message
    assert received(api_server) == []
    assert asyncio.run(engine.health())["status"] == "unavailable"


def test_health_reports_the_services_answer(engine: FaceFusionApiEngine) -> None:
    health = asyncio.run(engine.health())

    assert health["status"] == "available"
    assert health["upstream"] == {"status": "healthy", "service": "facefusion"}


def test_a_service_that_is_not_listening_is_upstream_unavailable(
    image_run: Callable[..., Run],
    tmp_path: Path,
    fetcher: SafeFetcher,
    shared_dir: Path,
) -> None:
    engine = make_engine(tmp_path, fetcher, f"http://127.0.0.1:{free_port()}", shared_dir)
    run = image_run(engine)

    with pytest.raises(UpstreamUnavailable) as failure:
        run()

    assert failure.value.code == "facefusion_unavailable"


def test_cancel_stops_waiting_for_the_service(
    image_run: Callable[..., Run],
    engine: FaceFusionApiEngine,
    api_server: ServerProcess,
) -> None:
    set_knobs(api_server, slow_times=1, delay_s=3)
    run = image_run(engine)

    async def cancel_during_the_call() -> float:
        job = asyncio.ensure_future(run.prepare_and_run())
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(received, api_server):
            assert time.monotonic() < deadline, "the service was never called"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        run.cancel.set()
        with pytest.raises(JobCancelled):
            await job
        return time.monotonic() - started

    assert asyncio.run(cancel_during_the_call()) < 1.0


def test_a_model_the_service_does_not_offer_fails_without_calling_it(
    engine: FaceFusionApiEngine,
    api_server: ServerProcess,
    tmp_path: Path,
    source_url: str,
    target_image_url: str,
) -> None:
    task = face_swap_task(source_url=source_url, target_url=target_image_url, model="hyperswap_1a_256")

    with pytest.raises(JobFailed) as failure:
        Run(engine, task, tmp_path / "work")()

    assert failure.value.code == "model_not_supported"
    assert received(api_server) == []


class TestResolveOutputPath:
    """The shared-folder rule on its own, with every accepted and refused form."""

    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        root = tmp_path / "shared"
        (root / "outputs").mkdir(parents=True)
        (root / "outputs" / "a.jpg").write_bytes(b"x")
        return root

    @pytest.mark.parametrize("given", ["/outputs/a.jpg", "outputs/a.jpg", "outputs//a.jpg"])
    def test_the_seeds_forms_resolve_inside(self, root: Path, given: str) -> None:
        assert resolve_output_path(given, root) == (root / "outputs" / "a.jpg").resolve()

    def test_an_absolute_path_inside_is_accepted(self, root: Path) -> None:
        assert (
            resolve_output_path(str(root / "outputs" / "a.jpg"), root)
            == (root / "outputs" / "a.jpg").resolve()
        )

    @pytest.mark.parametrize(
        "given", ["", "../a.jpg", "outputs/../../a.jpg", "outputs/a.jpg\x00.png", "/etc/passwd"]
    )
    def test_escapes_are_refused(self, root: Path, given: str) -> None:
        with pytest.raises(JobFailed) as failure:
            resolve_output_path(given, root)
        assert failure.value.code == "unsafe_output_path"

    def test_a_symlinked_folder_leading_out_is_refused(self, root: Path, tmp_path: Path) -> None:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "b.jpg").write_bytes(b"x")
        (root / "linked").symlink_to(tmp_path / "elsewhere")

        with pytest.raises(JobFailed) as failure:
            resolve_output_path("/linked/b.jpg", root)
        assert failure.value.code == "unsafe_output_path"

    def test_a_missing_file_is_no_output(self, root: Path) -> None:
        with pytest.raises(JobFailed) as failure:
            resolve_output_path("/outputs/missing.jpg", root)
        assert failure.value.code == "facefusion_no_output"
