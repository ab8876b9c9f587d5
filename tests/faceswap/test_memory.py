"""Streaming: a clip six times longer must not need more memory (each run in its own process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT
from .media import write_clip

SHORT_FRAMES = 20
LONG_FRAMES = 6 * SHORT_FRAMES


def measure_swap_memory(target_path: Path, output_path: Path) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-m", "tests.faceswap.rss_probe", str(target_path), str(output_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.slow
@pytest.mark.usefixtures("models_dir")
def test_peak_memory_does_not_grow_with_video_length(tmp_path: Path) -> None:
    short_clip, long_clip = tmp_path / "short.mp4", tmp_path / "long.mp4"
    write_clip(short_clip, frame_count=SHORT_FRAMES, size=384)
    write_clip(long_clip, frame_count=LONG_FRAMES, size=384)

    short = measure_swap_memory(short_clip, tmp_path / "short_out.mp4")
    long = measure_swap_memory(long_clip, tmp_path / "long_out.mp4")

    assert (short["frames"], long["frames"]) == (SHORT_FRAMES, LONG_FRAMES)
    assert long["peak_mib"] <= 1.2 * short["peak_mib"], f"short {short}, long {long}"
    # Keeping every extra 384 px frame (~0.6 MiB as BGR + YUV) would add ~60 MiB here.
    assert (long["peak_mib"] - long["baseline_mib"]) - (short["peak_mib"] - short["baseline_mib"]) < 20
