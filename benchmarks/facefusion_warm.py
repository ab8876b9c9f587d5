"""Figure 5 (issue 15 item 1): what a FaceFusion image job costs beyond the swap itself,
with one ``headless-run`` per job (cold) and with a warm host (FaceFusion and its models
loaded once per engine slot).

The real FaceFusion 3.8.1 from the real-peer tier (``make peers``) runs on CPU with
stand-in models padded to about the real models' sizes (scripts/peers/
facefusion_standin_models.py ``--real-sizes``, about 1.2 GB for a face swap: loading and
hash-checking them costs what the real ones cost). Each job goes through the real engine
(``FaceFusionEngine.run``, after ``prepare``): Grace Hopper onto the 512 px astronaut.

Baseline (same run): the swap itself, FaceFusion's own timing of the job ("processing to
image succeeded in N seconds": content analysis, detection, swap, its ffmpeg steps) on a
warm host, where the models are already loaded. The overhead of a job is its wall time
in the engine minus that.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Row, median, verdict

__all__ = ["facefusion_rows"]

WARM_OVERHEAD_TARGET_S = 0.2
BENCH_MODELS = REPO / ".tools" / "facefusion" / "bench-models"


def _engine(root: Path, data_dir: Path, *, warm: bool) -> Any:
    from gpu_runner.engines.facefusion import FaceFusionEngine
    from shared.safe_fetch import SafeFetcher
    from shared.settings import Settings
    from tests.peers import facefusion_peer

    settings = Settings(
        data_dir=data_dir,
        facefusion_command=facefusion_peer.facefusion_command(root),
        facefusion_execution_providers="cpu",
        facefusion_warm=warm,
        task_timeout_s=600.0,
    )
    fetcher = SafeFetcher(
        max_bytes=50 << 20, timeout_s=10.0, max_image_pixels=40_000_000, allow_loopback=True
    )
    return FaceFusionEngine(settings, fetcher)


async def _jobs(engine: Any, workdir: Path, count: int, task: Any) -> list[tuple[float, float]]:
    """(wall seconds in ``run``, FaceFusion's own seconds) per job."""
    timings = []
    try:
        for index in range(count):
            job = await engine.prepare(task, workdir / f"job-{index}")
            started = time.perf_counter()
            result = await engine.run(job, lambda _progress: None, asyncio.Event())
            timings.append((time.perf_counter() - started, float(result.metadata["facefusion_s"])))
    finally:
        await engine.close()
    return timings


def _bench_root(workdir: Path) -> Path:
    """A FaceFusion folder whose models are the real-size stand-ins (made once, kept in .tools)."""
    from tests.peers import facefusion_peer

    subprocess.run(
        [
            str(facefusion_peer.FACEFUSION_PYTHON),
            str(REPO / "scripts" / "peers" / "facefusion_standin_models.py"),
            str(BENCH_MODELS),
            "--real-sizes",
            "--swappers",
            "inswapper_128_fp16",
        ],
        check=True,
        timeout=900,
        capture_output=True,
    )
    return facefusion_peer.private_root(workdir, models_from=BENCH_MODELS)


def facefusion_rows(workdir: Path, *, cold_jobs: int = 2, warm_jobs: int = 4) -> list[Row]:
    from PIL import Image

    from tests.facefusion.conftest import data_url, face_swap_task
    from tests.faceswap.media import GRACE_HOPPER_PATH, astronaut_bgr
    from tests.peers import facefusion_peer

    figure = "5. FaceFusion image job"
    if not facefusion_peer.installed():
        return [Row(figure, "not measured: " + facefusion_peer.missing_reason(), "", "", "not measured")]
    workdir.mkdir(parents=True, exist_ok=True)
    root = _bench_root(workdir)
    target = workdir / "astronaut.png"
    Image.fromarray(astronaut_bgr()[:, :, ::-1]).save(target)
    task = face_swap_task(
        source_url=data_url(GRACE_HOPPER_PATH, "image/jpeg"), target_url=data_url(target, "image/png")
    )
    warm = asyncio.run(
        _jobs(_engine(root, workdir / "warm-data", warm=True), workdir / "warm", warm_jobs + 1, task)
    )
    cold = asyncio.run(
        _jobs(_engine(root, workdir / "cold-data", warm=False), workdir / "cold", cold_jobs, task)
    )
    first_wall = warm[0][0]
    warm = warm[1:]  # the first job started the host
    swap_s = median([own for _wall, own in warm])
    warm_overhead = median([wall - own for wall, own in warm])
    cold_overhead = median([wall for wall, _own in cold]) - swap_s
    baseline = f"the swap itself {swap_s:.2f} s (FaceFusion's own timing on a warm host)"
    return [
        Row(
            f"{figure}, cold (one headless-run per job)",
            f"+{cold_overhead:.2f} s per job beyond the swap (median of {len(cold)})",
            "info",
            baseline,
            "info",
            note="Python start, FaceFusion's imports, its CRC32 check of every model file (about 1.2 GB "
            "of real-size stand-ins) and ONNX session creation, paid by every job.",
        ),
        Row(
            f"{figure}, warm host",
            f"+{warm_overhead:.3f} s per job beyond the swap (median of {len(warm)}; "
            f"the host's first job {first_wall:.1f} s)",
            f"<= {WARM_OVERHEAD_TARGET_S} s",
            baseline,
            verdict(warm_overhead <= WARM_OVERHEAD_TARGET_S),
        ),
    ]
